//! feedline's core: the data path between storage and the accelerator.
//!
//! * [`ring`]: the bounded, ordered slot ring that fetched bytes land in.
//! * [`prefetch`]: runs a [`plan`] through a [`store`] into the ring.
//! * [`store`]: the storage boundary (local files, remote, chaos, routing).
//! * [`evict`]: eviction policies for the node cache (S3-FIFO, LRU, plan-aware).
//! * [`cache`]: the node cache in front of the router, shared by processes.
//!
//! No Python here: `cargo test` covers it all.

pub mod cache;
pub mod chaos;
pub mod config;
pub mod counter;
pub mod error;
pub mod evict;
pub mod fork;
pub mod layers;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod prefetch;
pub mod reader;
pub mod ring;
pub mod rng;
pub mod route;
pub mod runtime;
pub mod storage;
pub mod store;
mod sync;
pub mod telemetry;

pub use error::{Error, ReplicaFailure, Result};
