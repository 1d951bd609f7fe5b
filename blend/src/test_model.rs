//! The tiny random model of the crate's unit tests.

use kvquilt_model::{DType, Device, Model, ModelConfig};

/// SmolLM2's architecture at a tiny size (2 layers, hidden 64, 4 query and 2 KV heads of 16,
/// vocabulary 64) with random f32 weights on the CPU, for up to `context` positions.
pub(crate) fn tiny_random(context: usize) -> Model {
    let mut c = ModelConfig::smollm2_135m();
    c.num_layers = 2;
    c.hidden_size = 64;
    c.intermediate_size = 32;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 64;
    c.context_length = context;
    Model::random(c, &Device::Cpu, DType::F32).expect("a tiny random model")
}
