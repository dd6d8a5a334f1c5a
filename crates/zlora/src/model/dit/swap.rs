//! Block swap: a stack whose first `resident` blocks stay on the compute device while the
//! others' frozen Linear weights (dense or quantized) wait in host memory. A swapped block is
//! fetched (its weights copied to the device) just before it runs and dropped after; its
//! norms, biases and adapters stay resident, so a trainable LoRA's `Var`s are the same
//! tensors in every fetched copy.
//!
//! [`BlockStack::walk`] fetches one block ahead: block i+1's copy is issued before block i
//! computes, so at most two swapped blocks are on the device at once. What that overlaps
//! depends on the device. On the CPU host and device are one memory and the copy is a plain
//! memcpy into a fresh allocation (the path and its count are the same; nothing overlaps).
//! On CUDA, candle 0.11.1 copies from pageable host memory (it has no pinned allocation) on
//! the one stream that also runs the kernels: the host-side staging of block i+1 overlaps
//! the GPU's still-queued kernels, but the DMA itself runs in stream order between kernels,
//! never during them. `zlora plan` counts the transfer time in full for that reason.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Result};

use super::TransformerBlock;

/// Swapped blocks fetched and the bytes their weights moved, since the model was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfers {
    pub blocks: usize,
    pub bytes: usize,
}

#[derive(Debug, Default)]
struct Counter {
    blocks: AtomicUsize,
    bytes: AtomicUsize,
}

/// A stack of blocks in the order they run, some of them swapped.
#[derive(Debug, Clone)]
pub struct BlockStack {
    blocks: Vec<TransformerBlock>,
    /// Blocks [0, resident) stay on the device.
    resident: usize,
    counter: Arc<Counter>,
}

impl BlockStack {
    /// Keeps the first `resident` blocks on the device and moves the others' frozen weights
    /// to host memory, one block at a time as `blocks` yields them (so at most one swapped
    /// block is ever on the device while loading).
    pub fn new(
        blocks: impl Iterator<Item = Result<TransformerBlock>>,
        resident: usize,
    ) -> Result<Self> {
        let blocks = blocks
            .enumerate()
            .map(|(i, block)| {
                let mut block = block?;
                if i >= resident {
                    block.offload(&Device::Cpu)?;
                }
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resident: resident.min(blocks.len()),
            blocks,
            counter: Arc::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// How many blocks stay on the device.
    pub fn resident(&self) -> usize {
        self.resident
    }

    /// What swapping has moved so far (shared by the model's clones).
    pub fn transfers(&self) -> Transfers {
        Transfers {
            blocks: self.counter.blocks.load(Ordering::Relaxed),
            bytes: self.counter.bytes.load(Ordering::Relaxed),
        }
    }

    /// Block i ready to run: borrowed when resident, else a fetched copy.
    fn get(&self, i: usize) -> Result<Cow<'_, TransformerBlock>> {
        let block = &self.blocks[i];
        if i < self.resident {
            return Ok(Cow::Borrowed(block));
        }
        let mut copy = block.clone();
        let bytes = copy.fetch()?;
        self.counter.blocks.fetch_add(1, Ordering::Relaxed);
        self.counter.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(Cow::Owned(copy))
    }

    /// The blocks in `order` (indices into the stack), each ready to run, the next one
    /// fetched before the current one is handed out.
    pub fn walk<I: Iterator<Item = usize>>(&self, order: I) -> Walk<'_, I> {
        let mut walk = Walk {
            stack: self,
            order,
            next: None,
        };
        walk.next = walk.fetch_next();
        walk
    }

    pub(super) fn blocks_mut(&mut self) -> &mut [TransformerBlock] {
        &mut self.blocks
    }
}

/// A walk over a stack with one block fetched ahead.
pub struct Walk<'a, I> {
    stack: &'a BlockStack,
    order: I,
    next: Option<Result<(usize, Cow<'a, TransformerBlock>)>>,
}

impl<'a, I: Iterator<Item = usize>> Walk<'a, I> {
    fn fetch_next(&mut self) -> Option<Result<(usize, Cow<'a, TransformerBlock>)>> {
        let i = self.order.next()?;
        Some(self.stack.get(i).map(|block| (i, block)))
    }
}

impl<'a, I: Iterator<Item = usize>> Iterator for Walk<'a, I> {
    type Item = Result<(usize, Cow<'a, TransformerBlock>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let current = self.next.take()?;
        self.next = self.fetch_next();
        Some(current)
    }
}
