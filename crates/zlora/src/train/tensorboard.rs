//! TensorBoard event files (`[log] tensorboard = true` → RUN/tensorboard/), written without
//! TensorFlow: a TFRecord stream of `tensorboard.Event` protobufs.
//!
//! A record is the data's length (u64 LE), the masked CRC-32C of those 8 bytes, the data,
//! and the masked CRC-32C of the data. The first event of a file carries
//! `file_version: "brain.Event:2"`; the others a step with scalar or image summaries. The
//! messages are declared here with prost's derive (the field numbers of TensorBoard's
//! `event.proto` and `summary.proto`), so no protoc or build script is involved.
//!
//! Resuming rewrites the folder's files without the events past the resumed step (as the
//! JSONL log does), so every reader sees one history; a record cut short by a kill is
//! dropped with them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// The folder inside the run's output.
pub const DIR: &str = "tensorboard";
const FILE_PREFIX: &str = "events.out.tfevents.";
const FILE_VERSION: &str = "brain.Event:2";
/// `Summary.Image.colorspace` of RGB.
const RGB: i32 = 3;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Content", tags = "2, 4")]
    content: Option<Content>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Content {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

#[derive(Clone, PartialEq, Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

/// One run's event file, appended to and flushed at every event.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Opens a new event file in `dir` (the older files' events past the resumed step
    /// dropped first: [`drop_after`]).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = format!("{FILE_PREFIX}{}.{}", unix_seconds(), hostname());
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut writer = Self { path, file };
        // A file of this name exists when a run restarts within the same second: it already
        // has its header.
        if writer
            .file
            .metadata()
            .map_err(|e| Error::io(&writer.path, e))?
            .len()
            == 0
        {
            writer.write(Event {
                wall_time: wall_time(),
                file_version: Some(FILE_VERSION.into()),
                ..Event::default()
            })?;
        }
        Ok(writer)
    }

    /// One scalar per (tag, value) at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| Value {
                tag: tag.to_string(),
                content: Some(Content::SimpleValue(*v as f32)),
            })
            .collect();
        self.summary(step, value)
    }

    /// A PNG (its bytes as written) of `width`×`height` RGB pixels at `step`.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        (width, height): (u32, u32),
    ) -> Result<()> {
        let image = Image {
            height: height as i32,
            width: width as i32,
            colorspace: RGB,
            encoded_image_string: png,
        };
        let value = Value {
            tag: tag.into(),
            content: Some(Content::Image(image)),
        };
        self.summary(step, vec![value])
    }

    fn summary(&mut self, step: u64, value: Vec<Value>) -> Result<()> {
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write(&mut self, event: Event) -> Result<()> {
        let record = record(&event.encode_to_vec());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Drops the events of steps after `step` from the event files in `dir` (a run resumed at
/// `step`, with TensorBoard on or not now); nothing to do when there is no such folder.
pub fn drop_after(dir: &Path, step: u64) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for file in event_files(dir)? {
        keep_until(&file, step)?;
    }
    Ok(())
}

/// TFRecord framing of one serialized event.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's CRC: CRC-32C rotated right by 15 bits plus a constant, so that a CRC stored
/// inside checked data does not cancel out.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// The complete records of a file with their events, in order; reading stops at the first
/// record that is cut short or fails its checksums (a write interrupted by a kill).
fn read_records(bytes: &[u8]) -> Vec<(&[u8], Event)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 12 {
        let (len_bytes, crc) = (&rest[..8], &rest[8..12]);
        if masked_crc(len_bytes).to_le_bytes() != crc {
            break;
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        let Some(end) = len.checked_add(16).filter(|&end| end <= rest.len()) else {
            break;
        };
        let data = &rest[12..12 + len];
        let event = Event::decode(data);
        match event {
            Ok(event) if masked_crc(data).to_le_bytes() == rest[12 + len..end] => {
                out.push((&rest[..end], event));
            }
            _ => break,
        }
        rest = &rest[end..];
    }
    out
}

/// Rewrites `path` with the header and the events up to `step`.
fn keep_until(path: &Path, step: u64) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let kept: Vec<u8> = read_records(&bytes)
        .into_iter()
        .filter(|(_, e)| e.file_version.is_some() || e.step <= step as i64)
        .flat_map(|(r, _)| r.iter().copied())
        .collect();
    if kept.len() != bytes.len() {
        write_atomic(path, &kept, true)?;
    }
    Ok(())
}

/// The event files zlora may have written in `dir`.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(crate::fsutil::sorted_entries(dir)?
        .into_iter()
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(FILE_PREFIX))
        })
        .collect())
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn unix_seconds() -> u64 {
    wall_time() as u64
}

/// This machine's name, as TensorBoard's own writers put it in the file name.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // when the name fits, and the last byte is never written.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) } == 0;
    let name = match ok {
        true => String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(0)])
            .into_owned(),
        false => String::new(),
    };
    // The name becomes part of a file name: nothing that separates paths.
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values TensorBoard's own reader computes (`tensorflow_stub.pywrap_tensorflow.
    /// masked_crc32c`) for the length 0 and for the file-version string.
    #[test]
    fn the_masked_crc_is_tfrecords() {
        assert_eq!(masked_crc(&0u64.to_le_bytes()), 0x0798_0329);
        assert_eq!(masked_crc(FILE_VERSION.as_bytes()), 0x7c06_01ee);
    }

    #[test]
    fn resuming_drops_later_events_and_a_cut_record() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let path = {
            let mut w = EventWriter::open(dir.path())?;
            for step in 1..=5 {
                w.scalars(step, &[("loss", step as f64)])?;
            }
            w.path.clone()
        };
        // A kill in the middle of a record.
        let mut bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let whole = bytes.len();
        bytes.extend_from_slice(&record(&Event::default().encode_to_vec())[..10]);
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        assert_eq!(read_records(&bytes).len(), 6);
        drop_after(dir.path(), 3)?;
        let kept = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let steps: Vec<i64> = read_records(&kept).iter().map(|(_, e)| e.step).collect();
        assert_eq!(steps, [0, 1, 2, 3]);
        assert!(kept.len() < whole);
        Ok(())
    }
}
