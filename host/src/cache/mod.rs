//! The cache layer: the paged KV cache's shape and addressing, page tables and their
//! validation, the sequence allocator, and the device pools. It knows no attention algorithm
//! and launches no kernel; it builds on the runtime layer only.
pub(crate) mod allocator;
pub(crate) mod layout;
pub(crate) mod mla;
pub(crate) mod page_table;
pub(crate) mod paged;
