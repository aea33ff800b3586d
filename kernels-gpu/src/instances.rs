//! The kernels' instantiations: each algorithm's generic kernel with the constant parameters
//! the ABI's functions give it, as a macro that calls it on a parameter block. `entries.rs`
//! makes the entry points of these; the CPU emulator (`emu/`) calls the same ones, so what it
//! runs is what the PTX holds.

/// `decode::decode` for queries of `$half` over a cache of `$kv` at head_dim `$dim`.
#[macro_export]
macro_rules! decode_instance {
    ($half:ty, $kv:ty, $dim:literal, $params:expr) => {
        $crate::decode::decode::<
            $half,
            $kv,
            $dim,
            { $crate::abi::decode_block_threads($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) },
            { $crate::abi::decode_stages($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) },
            { $crate::abi::decode_dense_stages($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) },
            false,
        >($params)
    };
}

/// `decode::decode` with several query tokens a request (`decode_multi_*`), over a cache of the
/// queries' own type `$half`.
#[macro_export]
macro_rules! decode_multi_instance {
    ($half:ty, $dim:literal, $params:expr) => {
        $crate::decode::decode::<
            $half,
            $half,
            $dim,
            { $crate::abi::decode_block_threads($dim, 2) },
            { $crate::abi::decode_stages($dim, 2) },
            { $crate::abi::decode_dense_stages($dim, 2) },
            true,
        >($params)
    };
}

/// `prefill::prefill` (the portable kernel) at query-key dim `$qk` and value dim `$vo`, in
/// blocks of `$rows` packed query rows, reading a custom mask if `$masked`.
#[macro_export]
macro_rules! prefill_instance {
    ($half:ty, $kv:ty, $qk:literal, $vo:literal, $rows:literal, $masked:literal, $params:expr) => {
        $crate::prefill::prefill::<
            $half,
            $kv,
            $qk,
            $vo,
            { $rows / 64 },
            { $crate::abi::prefill_threads($vo) },
            { $crate::abi::prefill_stages($qk, $rows / 64) },
            $masked,
        >($params)
    };
}

/// `prefill_hopper::prefill_hopper` for queries of `$half` over a cache of `$kv` at head_dim
/// `$dim`.
#[macro_export]
macro_rules! prefill_hopper_instance {
    ($half:ty, $kv:ty, $dim:literal, $params:expr) => {
        $crate::prefill_hopper::prefill_hopper::<
            $half,
            $kv,
            $dim,
            { $crate::abi::hopper_prefill_tile_tokens($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) },
            { $crate::abi::hopper_prefill_stages($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) },
            { $crate::abi::hopper_prefill_byte_stages($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) },
            { $crate::abi::hopper_prefill_tile_tokens($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) as usize / 8 },
            { $crate::abi::hopper_prefill_tile_tokens($dim, <$kv as $crate::gpu::fp8::KvElem>::BYTES) as usize / 16 },
            { $dim / 8 },
        >($params)
    };
}
