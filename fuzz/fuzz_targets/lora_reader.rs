//! The LoRA reader on arbitrary bytes: every input must give Ok or Err, never a panic, an
//! abort or an allocation the input does not justify.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zlora::lora::{LoraFile, LoraHeader};

/// The tiny fixture model's width, so small inputs can reach the Z-Image code paths.
const DIM: usize = 32;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let _ = LoraHeader::from_bytes(path, data);
    if let Ok(file) = LoraFile::from_bytes(path, data, DIM) {
        // A LoKr delta is legitimately (l·k)×(m·n): only small ones are materialised here;
        // real use checks the shape against the model first.
        for m in file.modules.values() {
            if m.shape().is_ok_and(|(o, i)| o.saturating_mul(i) <= 1 << 20) {
                let _ = m.delta();
            }
        }
    }
});
