//! A safetensors reader that trusts nothing in the file.
//!
//! LoRA files come from anywhere, so the header is checked before any byte is used: the header
//! length against the file size, JSON syntax, duplicate keys (serde would silently keep the
//! last one), dtypes, shapes against byte counts (with overflow checks), offsets against the
//! data region, and overlaps. Every failure is an error naming the file, never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use crate::{Error, Result};

/// The safetensors format's own cap on the JSON header (100 MB); anything larger is corrupt.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's header entry, already validated against the file's data region.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the whole file.
    pub bytes: Range<usize>,
}

/// The validated header: `__metadata__` and every tensor entry by key.
#[derive(Debug)]
pub(crate) struct Header {
    pub metadata: BTreeMap<String, String>,
    pub entries: BTreeMap<String, Entry>,
}

impl Header {
    /// Key → shape, the view that name and architecture checks need (no tensor data).
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.shape.clone()))
            .collect()
    }
}

/// The JSON object's members in file order, duplicates kept so they can be reported.
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry()? {
                    out.push(kv);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Parses and validates the header of the safetensors image `bytes` read from `path`.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |msg: String| Error::bad_file(path, msg);
    let (json, data_start) = header_json(bytes).map_err(bad)?;
    let members: Members = serde_json::from_slice(json)
        .map_err(|e| bad(format!("safetensors header is not a JSON object: {e}")))?;
    let mut header = Header {
        metadata: BTreeMap::new(),
        entries: BTreeMap::new(),
    };
    let mut seen_metadata = false;
    for (key, value) in members.0 {
        if key == "__metadata__" {
            if std::mem::replace(&mut seen_metadata, true) {
                return Err(bad("safetensors header has two __metadata__ entries".into()));
            }
            header.metadata = metadata(value).map_err(bad)?;
            continue;
        }
        let entry = entry(&key, value, data_start, bytes.len()).map_err(bad)?;
        if header.entries.insert(key.clone(), entry).is_some() {
            return Err(bad(format!("safetensors header lists tensor {key} twice")));
        }
    }
    check_overlaps(&header.entries).map_err(bad)?;
    Ok(header)
}

/// Splits off the JSON header; returns it with the offset where tensor data starts.
fn header_json(bytes: &[u8]) -> std::result::Result<(&[u8], usize), String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{} bytes is too short for a safetensors file", bytes.len()))?;
    let len = u64::from_le_bytes(len_bytes);
    let available = bytes.len() as u64 - 8;
    if len > MAX_HEADER_BYTES || len > available {
        return Err(format!(
            "safetensors header claims {len} bytes but the file has {available} after the \
             length field (truncated or not a safetensors file)"
        ));
    }
    let end = 8 + len as usize;
    Ok((&bytes[8..end], end))
}

fn metadata(value: serde_json::Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let serde_json::Value::Object(map) = value else {
        return Err("__metadata__ is not a JSON object".into());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(format!(
                "__metadata__ value of {k} is not a string: {other}"
            )),
        })
        .collect()
}

fn entry(
    key: &str,
    value: serde_json::Value,
    data_start: usize,
    file_len: usize,
) -> std::result::Result<Entry, String> {
    let raw: RawEntry = serde_json::from_value(value)
        .map_err(|e| format!("tensor {key}: bad header entry: {e}"))?;
    let dtype = match raw.dtype.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(format!(
                "tensor {key} has dtype {other}; LoRA tensors must be F32, F16 or BF16"
            ))
        }
    };
    let (begin, end) = raw.data_offsets;
    let data_len = file_len - data_start;
    if begin > end || end > data_len {
        return Err(format!(
            "tensor {key}: data offsets [{begin}, {end}] lie outside the {data_len} data bytes \
             (truncated or corrupt file)"
        ));
    }
    let expected = raw
        .shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
    if expected != Some(end - begin) {
        return Err(format!(
            "tensor {key}: shape {:?} of {} does not match its {} data bytes",
            raw.shape,
            raw.dtype,
            end - begin
        ));
    }
    Ok(Entry {
        dtype,
        shape: raw.shape,
        bytes: data_start + begin..data_start + end,
    })
}

/// Two tensors sharing bytes means the offsets were forged or damaged.
fn check_overlaps(entries: &BTreeMap<String, Entry>) -> std::result::Result<(), String> {
    let mut ranges: Vec<(&Range<usize>, &String)> =
        entries.iter().map(|(k, e)| (&e.bytes, k)).collect();
    ranges.sort_by_key(|(r, _)| (r.start, r.end));
    for pair in ranges.windows(2) {
        let ((a, ka), (b, kb)) = (pair[0], pair[1]);
        if b.start < a.end {
            return Err(format!("tensors {ka} and {kb} overlap in the data region"));
        }
    }
    Ok(())
}

/// Decodes one validated entry into an f32 CPU tensor.
pub(crate) fn tensor(path: &Path, bytes: &[u8], key: &str, entry: &Entry) -> Result<Tensor> {
    let data = &bytes[entry.bytes.clone()];
    Tensor::from_raw_buffer(data, entry.dtype, &entry.shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| Error::bad_file(path, format!("tensor {key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn err(json: &str, data: &[u8]) -> String {
        match parse(Path::new("x.safetensors"), &image(json, data)) {
            Ok(_) => panic!("expected an error for {json}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepts_a_valid_header_and_decodes_f16() {
        let json =
            r#"{"__metadata__":{"a":"b"},"t":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
        let bytes = image(json, &[0x00, 0x3c, 0x00, 0xc0]); // 1.0, -2.0
        let h = parse(Path::new("x"), &bytes).unwrap();
        assert_eq!(h.metadata["a"], "b");
        let t = tensor(Path::new("x"), &bytes, "t", &h.entries["t"]).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![1.0, -2.0]);
    }

    #[test]
    fn rejects_malformed_headers() {
        let t = |o: &str| format!(r#""t":{{"dtype":"F32","shape":[1],"data_offsets":{o}}}"#);
        let cases = [
            (format!("{{{}}}", t("[0,8]")), "outside"),
            (format!("{{{}}}", t("[4,0]")), "outside"),
            (format!("{{{},{}}}", t("[0,4]"), t("[0,4]")), "twice"),
            (
                r#"{"t":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#.into(),
                "I64",
            ),
            (
                r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#.into(),
                "does not match",
            ),
            (
                r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#
                    .into(),
                "does not match",
            ),
            (r#"{"__metadata__":{"a":1}}"#.into(), "not a string"),
            ("[1,2]".into(), "not a JSON object"),
        ];
        for (json, needle) in cases {
            let msg = err(&json, &[0; 4]);
            assert!(msg.contains(needle), "{json}: {msg}");
        }
    }

    #[test]
    fn rejects_overlaps_and_bad_lengths() {
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}"#;
        assert!(err(json, &[0; 8]).contains("overlap"));
        let short = parse(Path::new("x"), &[1, 2, 3]).unwrap_err().to_string();
        assert!(short.contains("too short"), "{short}");
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let msg = parse(Path::new("x"), &huge).unwrap_err().to_string();
        assert!(msg.contains("truncated"), "{msg}");
    }
}
