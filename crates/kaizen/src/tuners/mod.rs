//! PEFT methods, one folder each (LoRA, IA3, prompt/prefix tuning, adapters). Each reaches a model
//! only through a named linear layer, the KV cache or the input embeddings.

pub mod lora;
