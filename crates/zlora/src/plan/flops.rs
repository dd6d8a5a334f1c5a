//! Floating-point operations of one training step, counted from the model's Linears and the
//! token counts: a Linear costs 2 · in · out per token it sees, attention 4 · tokens² · dim per
//! block (q·kᵀ and probabilities · v), an adapter module what [`LowRank`] counts per token
//! (a LoRA 2 · its parameters). The backward pass costs twice the forward of the frozen part
//! it walks plus the trained adapter's own backward (twice its forward for a LoRA, 4 · out ·
//! in per token for a LoKr or LoHa); checkpointing adds one more forward of the trained
//! blocks. Differential output preservation adds, per micro-batch, a forward without the
//! LoRA (the prior) and a second forward and backward. Element-wise work (norms, rope, softmax) is left out: it is
//! memory-bound and a few percent of the matmuls at Z-Image's width.

use serde::Serialize;

use super::dims::{stack_of, LowRank, STACKS};
use super::memory::{Run, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Flops {
    /// One forward pass over one micro-batch.
    pub forward: f64,
    /// Twice the forward of the blocks and layers the backward walks.
    pub backward: f64,
    /// The trained blocks once more (checkpointing), else 0.
    pub recompute: f64,
    /// Differential output preservation: the prior's forward without the LoRA, then forward
    /// + backward + recompute once more; else 0.
    pub preservation: f64,
    /// (forward + backward + recompute + preservation) × gradient accumulation.
    pub per_step: f64,
}

/// Token counts of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    pub batch: usize,
    pub image: usize,
    pub caption: usize,
}

impl Tokens {
    /// How many tokens (per item) a Linear or low-rank module at `path` sees.
    fn seen_by(&self, path: &str) -> usize {
        let module = path.splitn(3, '.').nth(2).unwrap_or("");
        match stack_of(path) {
            // adaLN reads the conditioning vector, once per item.
            Some(_) if module.starts_with("adaLN") => 1,
            Some(stack) => self.of_stack(stack),
            None if path.starts_with("all_x_embedder") => self.image,
            None if path.starts_with("cap_embedder") => self.caption,
            None if path.starts_with("all_final_layer") && path.ends_with(".linear") => {
                self.image + self.caption
            }
            None => 1,
        }
    }

    fn of_stack(&self, stack: &str) -> usize {
        match stack {
            "noise_refiner" => self.image,
            "context_refiner" => self.caption,
            _ => self.image + self.caption,
        }
    }
}

/// Where a module sits, for choosing what the backward walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Block(&'static str),
    FinalLayer,
    /// The patch, caption and timestep embedders.
    Embedders,
}

fn part_of(path: &str) -> Part {
    match stack_of(path) {
        Some(stack) => Part::Block(stack),
        None if path.starts_with("all_final_layer") => Part::FinalLayer,
        None => Part::Embedders,
    }
}

/// The forward cost of the parts of the model that `include` selects.
pub fn forward(run: &Run, tokens: Tokens, include: impl Fn(Part) -> bool) -> f64 {
    frozen_forward(run, tokens, &include) + adapter(run.lora, tokens, include, |m| m.forward_flops)
}

/// What the adapter `modules` inside the parts `include` selects cost per step, `per_token`
/// giving a module's cost per token.
fn adapter(
    modules: &[LowRank],
    tokens: Tokens,
    include: impl Fn(Part) -> bool,
    per_token: impl Fn(&LowRank) -> f64,
) -> f64 {
    modules
        .iter()
        .filter(|m| include(part_of(&m.path)))
        .map(|m| tokens.batch as f64 * tokens.seen_by(&m.path) as f64 * per_token(m))
        .sum()
}

/// The forward cost of the parts `include` selects without the trained adapter.
fn frozen_forward(run: &Run, tokens: Tokens, include: &impl Fn(Part) -> bool) -> f64 {
    let b = tokens.batch as f64;
    let linears: f64 = run
        .dims
        .linears
        .iter()
        .filter(|l| include(part_of(&l.path)))
        .map(|l| 2.0 * b * tokens.seen_by(&l.path) as f64 * l.params() as f64)
        .sum();
    let cfg = &run.dims.transformer;
    let attention: f64 = STACKS
        .into_iter()
        .filter(|s| include(Part::Block(s)))
        .map(|s| {
            let blocks = if s == "layers" {
                cfg.n_layers
            } else {
                cfg.n_refiner_layers
            };
            let t = tokens.of_stack(s) as f64;
            blocks as f64 * 4.0 * b * t * t * cfg.dim as f64
        })
        .sum();
    linears + adapter(run.adapter, tokens, include, |m| m.forward_flops) + attention
}

/// One optimizer step.
pub fn step(run: &Run, work: &Workload) -> Flops {
    let tokens = Tokens {
        batch: work.batch,
        image: work.image_tokens,
        caption: work.caption_tokens,
    };
    // The backward walks the main layers, the final layer and the refiners that carry a
    // LoRA; the embedders and untrained refiners are constants to it.
    let trained = |s: &str| s == "layers" || run.lora.iter().any(|m| m.stack() == Some(s));
    let in_blocks = |p: Part| matches!(p, Part::Block(s) if trained(s));
    let all = forward(run, tokens, |_| true);
    let blocks = forward(run, tokens, in_blocks);
    let final_layer = forward(run, tokens, |p| p == Part::FinalLayer);
    // The trained adapter's backward is its own (LoKr and LoHa go through the dense delta).
    let frozen = frozen_forward(run, tokens, &in_blocks) + final_layer;
    let backward = 2.0 * frozen + adapter(run.lora, tokens, in_blocks, |m| m.backward_flops);
    let recompute = if work.checkpointing { blocks } else { 0.0 };
    let pass = all + backward + recompute;
    let preservation = if work.preservation {
        let base = Run { lora: &[], ..*run };
        forward(&base, tokens, |_| true) + pass
    } else {
        0.0
    };
    Flops {
        forward: all,
        backward,
        recompute,
        preservation,
        per_step: work.accumulation as f64 * (pass + preservation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::dims::ModelDims;
    use crate::train::config::Variant;
    use crate::train::lora::LoraConfig;
    use crate::train::optim::OptimizerConfig;

    fn work(checkpointing: bool, accumulation: usize) -> Workload {
        Workload {
            batch: 1,
            image_tokens: 4096,
            caption_tokens: 512,
            image_pixels: 1024 * 1024,
            checkpointing,
            accumulation,
            base_bytes: 2.0,
            compute_bytes: 2.0,
            blocks_on_device: None,
            quantize_text_encoder: None,
            sample: None,
            optimizer: OptimizerConfig::default(),
            ema: false,
            preservation: false,
        }
    }

    #[test]
    fn a_1024_step_costs_what_the_textbook_rule_says() {
        let dims = ModelDims::built_in(Variant::Base).unwrap();
        let cfg: LoraConfig = toml::from_str("rank = 16\nalpha = 16").unwrap();
        let lora = dims.lora(&cfg);
        let run = Run {
            dims: &dims,
            lora: &lora,
            adapter: &[],
        };
        let plain = step(&run, &work(false, 1));
        // The rule 2 · parameters · tokens + 4 · S² · dim per layer, slightly high: adaLN
        // reads one vector per item and each refiner only its own stream.
        let s = 4096.0 + 512.0;
        let rule = 2.0 * 6.155e9 * s + 30.0 * 4.0 * s * s * 3840.0;
        let ratio = plain.forward / rule;
        assert!((0.9..1.0).contains(&ratio), "{ratio}");
        // The backward walks the main layers and the final layer only: just under 2×.
        let backward = plain.backward / plain.forward;
        assert!((1.8..2.0).contains(&backward), "{backward}");

        let checkpointed = step(&run, &work(true, 2));
        assert!(checkpointed.recompute > 0.9 * plain.forward);
        let per_micro = checkpointed.forward + checkpointed.backward + checkpointed.recompute;
        assert_eq!(checkpointed.per_step, 2.0 * per_micro);

        // Preservation: a prior forward without the LoRA (a little under the forward) and the
        // whole pass again, in each micro-batch.
        let preserving = step(
            &run,
            &Workload {
                preservation: true,
                ..work(true, 2)
            },
        );
        let prior = preserving.preservation - per_micro;
        let share = prior / checkpointed.forward;
        assert!((0.99..1.0).contains(&share), "{share}");
        assert_eq!(
            preserving.per_step,
            2.0 * (per_micro + preserving.preservation)
        );
    }

    /// A LoKr's forward is two small products per token, a few percent of the step's; its
    /// trained backward (the dense delta's gradient and the input gradient through it) is 4 · out · in
    /// per token: one more backward's worth of the adapted Linears. A LoHa's forward adds its
    /// dense delta's product.
    #[test]
    fn lokr_and_loha_cost_their_dense_products() {
        let dims = ModelDims::built_in(Variant::Base).unwrap();
        let cost = |lora: &str| {
            let cfg: LoraConfig = toml::from_str(&format!("alpha = 16\n{lora}")).unwrap();
            let lora = dims.lora(&cfg);
            let run = Run {
                dims: &dims,
                lora: &lora,
                adapter: &[],
            };
            step(&run, &work(false, 1))
        };
        let (lora, lokr, loha) = (
            cost("rank = 16"),
            cost("rank = 16\nalgorithm = \"lokr\""),
            cost("rank = 16\nalgorithm = \"loha\""),
        );
        // The default targets: 30 layers of q, k, v, out (3840²) and w1, w2, w3 (3840·10240).
        let adapted = 30.0 * (4.0 * 3840.0 * 3840.0 + 3.0 * 3840.0 * 10240.0);
        let tokens = 4096.0 + 512.0;
        // The LoKr forward per token, w1 [l, m] and w2 [k, n]: 2 · (m·n·k + l·m·k); q, k, v,
        // out (60, 64)², w1 and w3 out (80, 128) in (60, 64), w2 the other way round.
        let kron = |l: f64, k: f64, m: f64, n: f64| 2.0 * (m * n * k + l * m * k);
        let lokr_forward = 30.0
            * (4.0 * kron(60.0, 64.0, 60.0, 64.0)
                + 2.0 * kron(80.0, 128.0, 60.0, 64.0)
                + kron(60.0, 64.0, 80.0, 128.0));
        // Both backwards walk the same frozen part: what differs is the adapter's own.
        let lokr_own = lokr.backward - (lora.backward - 2.0 * (lora.forward - lokr.forward));
        let want = (4.0 * adapted - 2.0 * lokr_forward) * tokens;
        assert!((lokr_own / want - 1.0).abs() < 1e-9, "{lokr_own} vs {want}");
        assert!((lokr.forward / lora.forward - 1.0).abs() < 0.05);
        let loha_extra = loha.forward - lora.forward;
        assert!((loha_extra / (2.0 * adapted * tokens) - 1.0).abs() < 0.01);
    }
}
