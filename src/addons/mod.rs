//! What users add to a model at run time: LoRAs (`lora`, merged into the weights as they are
//! read) and textual-inversion embeddings (`embedding`, new tokens for the text encoder).

pub mod embedding;
pub mod lora;
