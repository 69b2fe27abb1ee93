//! Layers shared by every architecture. Each layer owns its frozen tensors and exposes a forward;
//! the training engine adds the matching hand-derived backward beside each forward.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod grads;
pub mod kv_cache;
pub mod linear;
pub mod loss;
pub mod math;
pub mod matrix;
pub mod norm;
pub mod quant;
pub mod recast;
pub mod rotary;

pub use embedding::Embedding;
pub use grads::Grads;
pub use kv_cache::KvCache;
pub use linear::{Linear, LinearAdapter};
pub use matrix::Matrix;
pub use norm::{LayerNorm, Norm, RmsNorm};
pub use recast::Recast;
pub use rotary::Rotary;
