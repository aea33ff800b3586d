//! Shared pieces of ferrinfer's GPU tests and benchmark: the GPU test harness, random paged
//! workloads, and comparisons against the CPU reference.

pub mod compare;
pub mod graph;
pub mod harness;
pub mod workload;
