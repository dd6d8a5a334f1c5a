//! The GPU table: memory, sustained throughput, price and multi-GPU link per GPU, from an
//! editable TOML file. The shipped table (gpus.toml, with its sources) is built in;
//! `--gpu-table` replaces it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const BUILT_IN: &str = include_str!("gpus.toml");

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuTable {
    pub defaults: Defaults,
    pub storage: Storage,
    /// What data-parallel training exchanges gradients over.
    pub links: Links,
    #[serde(rename = "gpu")]
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Share of the peak a training step sustains.
    pub efficiency: f64,
    pub cuda_context_gib: f64,
    pub allocator_slack: f64,
    /// Host-to-device copy rate in GB/s (10^9 bytes) that block swap streams weights at.
    pub host_link_gb_s: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub usd_per_gb_month: f64,
    pub source: String,
}

/// How the GPUs of a data-parallel run reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// Through the PCIe bus (GeForce cards: staged through host memory).
    #[default]
    Pcie,
    Nvlink,
    /// Between nodes: every ring crosses it, so it sets the pace (docs/plan.md).
    Network,
}

const LINKS: [(Link, &str); 3] = [
    (Link::Pcie, "pcie"),
    (Link::Nvlink, "nvlink"),
    (Link::Network, "network"),
];

impl Link {
    pub fn name(self) -> &'static str {
        LINKS
            .iter()
            .find(|(l, _)| *l == self)
            .map_or("", |(_, n)| n)
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Link {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        LINKS
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(s.trim()))
            .map(|(l, _)| *l)
            .ok_or_else(|| format!("unknown link '{s}': use pcie, nvlink or network"))
    }
}

/// Each link's all-reduce figures.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    pub pcie: LinkSpec,
    pub nvlink: LinkSpec,
    pub network: LinkSpec,
}

impl Links {
    pub fn spec(&self, link: Link) -> &LinkSpec {
        match link {
            Link::Pcie => &self.pcie,
            Link::Nvlink => &self.nvlink,
            Link::Network => &self.network,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// All-reduce bus bandwidth in GB/s (10^9 bytes), as nccl-tests reports it: the rate
    /// that the 2(N−1)/N of the bytes each GPU sends crosses its link at.
    pub gb_s: f64,
    /// Per ring step, microseconds.
    pub latency_us: f64,
    pub source: String,
}

/// The link a GPU exchanges gradients over, in bytes per second and seconds per ring step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkRate {
    pub link: Link,
    pub bytes_per_s: f64,
    pub latency_s: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// What `--gpu` selects it by.
    pub name: String,
    pub label: String,
    pub memory_gib: f64,
    /// Dense BF16 tensor TFLOPS with FP32 accumulation.
    pub peak_tflops: f64,
    pub tflops_source: String,
    pub usd_per_hour: f64,
    /// Where the price comes from when it is not the table's default source.
    #[serde(default)]
    pub price_source: Option<String>,
    /// Overrides `[defaults] efficiency`.
    #[serde(default)]
    pub efficiency: Option<f64>,
    /// Overrides `[defaults] host_link_gb_s` (another PCIe generation or width).
    #[serde(default)]
    pub host_link_gb_s: Option<f64>,
    /// The usual link between several of these GPUs; only an `nvlink` GPU has NVLink.
    #[serde(default)]
    pub link: Link,
    /// Overrides `[links.<its link>] gb_s` (another NVLink generation, PCIe peer-to-peer).
    #[serde(default)]
    pub link_gb_s: Option<f64>,
}

impl GpuTable {
    /// The table shipped with zlora.
    pub fn built_in() -> Result<Self> {
        Self::parse(BUILT_IN).map_err(|e| Error::Invalid(format!("built-in GPU table: {e}")))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        Self::parse(&text).map_err(|e| Error::bad_file(path, e.to_string()))
    }

    fn parse(text: &str) -> Result<Self> {
        let table: Self = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?;
        table.validate()?;
        Ok(table)
    }

    fn validate(&self) -> Result<()> {
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let share = |v: f64| positive(v) && v <= 1.0;
        let non_negative = |v: f64| v >= 0.0 && v.is_finite();
        let d = &self.defaults;
        if !positive(d.host_link_gb_s) {
            return Err(Error::Invalid(
                "[defaults] host_link_gb_s must be positive".into(),
            ));
        }
        if !share(d.efficiency) {
            return Err(Error::Invalid(
                "[defaults] efficiency must be in (0, 1]".into(),
            ));
        }
        if !(non_negative(d.cuda_context_gib) && non_negative(d.allocator_slack)) {
            return Err(Error::Invalid(
                "[defaults] cuda_context_gib and allocator_slack must not be negative".into(),
            ));
        }
        for (link, _) in LINKS {
            let spec = self.links.spec(link);
            if !(positive(spec.gb_s) && non_negative(spec.latency_us)) {
                return Err(Error::Invalid(format!(
                    "[links.{link}] gb_s must be positive and latency_us not negative"
                )));
            }
        }
        if !non_negative(self.storage.usd_per_gb_month) {
            return Err(Error::Invalid(
                "[storage] usd_per_gb_month must not be negative".into(),
            ));
        }
        for g in &self.gpus {
            let valid = positive(g.memory_gib)
                && positive(g.peak_tflops)
                && non_negative(g.usd_per_hour)
                && g.efficiency.is_none_or(share)
                && g.host_link_gb_s.is_none_or(positive)
                && g.link_gb_s.is_none_or(positive);
            if !valid {
                return Err(Error::Invalid(format!(
                    "GPU {:?}: memory_gib, peak_tflops, host_link_gb_s and link_gb_s must be \
                     positive, usd_per_hour not negative, efficiency in (0, 1]",
                    g.name
                )));
            }
        }
        if self.gpus.is_empty() {
            return Err(Error::Invalid("the GPU table lists no [[gpu]]".into()));
        }
        Ok(())
    }

    /// The GPUs named (case-insensitive), in the order given; all of them for an empty list.
    pub fn select(&self, names: &[String]) -> Result<Vec<Gpu>> {
        if names.is_empty() {
            return Ok(self.gpus.clone());
        }
        names
            .iter()
            .map(|n| {
                self.gpus
                    .iter()
                    .find(|g| g.name.eq_ignore_ascii_case(n.trim()))
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> = self.gpus.iter().map(|g| g.name.as_str()).collect();
                        Error::Invalid(format!(
                            "unknown GPU {n:?}; the table has {}",
                            known.join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// Host-to-device bytes per second of `gpu`.
    pub fn host_link(&self, gpu: &Gpu) -> f64 {
        gpu.host_link_gb_s.unwrap_or(self.defaults.host_link_gb_s) * 1e9
    }

    /// What several `gpu`s exchange gradients over: `chosen`, or the GPU's usual link. The
    /// GPU's `link_gb_s` applies to its usual link only; NVLink only where the GPU has it.
    pub fn link(&self, gpu: &Gpu, chosen: Option<Link>) -> Result<LinkRate> {
        let link = chosen.unwrap_or(gpu.link);
        if link == Link::Nvlink && gpu.link != Link::Nvlink {
            let with: Vec<&str> = self
                .gpus
                .iter()
                .filter(|g| g.link == Link::Nvlink)
                .map(|g| g.name.as_str())
                .collect();
            return Err(Error::Invalid(format!(
                "GPU {:?} has no NVLink (its link in the GPU table is {}): plan it over pcie or \
                 network, or choose GPUs with NVLink ({})",
                gpu.name,
                gpu.link,
                with.join(", ")
            )));
        }
        let spec = self.links.spec(link);
        let gb_s = match gpu.link_gb_s {
            Some(own) if link == gpu.link => own,
            _ => spec.gb_s,
        };
        Ok(LinkRate {
            link,
            bytes_per_s: gb_s * 1e9,
            latency_s: spec.latency_us * 1e-6,
        })
    }

    /// Sustained FLOP/s of `gpu`.
    pub fn sustained(&self, gpu: &Gpu) -> f64 {
        gpu.peak_tflops * 1e12 * gpu.efficiency.unwrap_or(self.defaults.efficiency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_table_parses_and_every_gpu_cites_its_throughput() {
        let t = GpuTable::built_in().unwrap();
        for g in &t.gpus {
            assert!(!g.tflops_source.is_empty(), "{}", g.name);
        }
        let names: Vec<String> = ["4090", "A5000", "l40s", "a100", "h100"]
            .map(String::from)
            .to_vec();
        assert_eq!(t.select(&names).unwrap().len(), 5);
        assert!(t.select(&["tpu".into()]).is_err());
    }

    #[test]
    fn nonsense_values_are_refused() {
        let bad = BUILT_IN.replace("memory_gib = 24", "memory_gib = -24");
        assert!(GpuTable::parse(&bad).is_err());
        let typo = BUILT_IN.replace("usd_per_hour = 0.60", "usd_per_hr = 0.60");
        assert!(GpuTable::parse(&typo).is_err());
        let still = BUILT_IN.replace("host_link_gb_s = 16.0", "host_link_gb_s = 0.0");
        let err = GpuTable::parse(&still).unwrap_err().to_string();
        assert!(err.contains("host_link_gb_s"), "{err}");
        let slow = BUILT_IN.replace("host_link_gb_s = 8.0", "host_link_gb_s = -8.0");
        let err = GpuTable::parse(&slow).unwrap_err().to_string();
        assert!(
            err.contains("4060ti-8") && err.contains("host_link_gb_s"),
            "{err}"
        );
        // The per-GPU link overrides the default.
        let table = GpuTable::built_in().unwrap();
        let gpu = |n: &str| table.select(&[n.to_string()]).unwrap().remove(0);
        assert_eq!(table.host_link(&gpu("4090")), 16e9);
        assert_eq!(table.host_link(&gpu("h100")), 32e9);
    }

    /// A GPU's own link_gb_s sets its usual link only; NVLink only where the table has it;
    /// unknown links and a still link are refused.
    #[test]
    fn each_gpu_exchanges_over_its_link() {
        let table = GpuTable::built_in().unwrap();
        let gpu = |n: &str| table.select(&[n.to_string()]).unwrap().remove(0);
        let rate = |n: &str, link: Option<Link>| {
            let r = table.link(&gpu(n), link).unwrap();
            (r.link, r.bytes_per_s / 1e9)
        };
        assert_eq!(rate("4090", None), (Link::Pcie, 8.0));
        assert_eq!(rate("h100-pcie", None), (Link::Pcie, 35.0));
        assert_eq!(rate("a100", None), (Link::Nvlink, 230.0));
        assert_eq!(rate("h100", None), (Link::Nvlink, 460.0));
        assert_eq!(rate("h100", Some(Link::Pcie)), (Link::Pcie, 8.0));
        assert_eq!(rate("h100", Some(Link::Network)), (Link::Network, 12.0));
        assert_eq!(
            rate("h100-pcie", Some(Link::Network)),
            (Link::Network, 12.0)
        );
        assert!(table.link(&gpu("l40s"), Some(Link::Nvlink)).is_err());
        assert_eq!("NVLink".parse::<Link>(), Ok(Link::Nvlink));
        assert!("infiniband".parse::<Link>().is_err());

        let unknown = BUILT_IN.replace("link = \"nvlink\"", "link = \"infiniband\"");
        assert!(GpuTable::parse(&unknown).is_err());
        let still = BUILT_IN.replace("gb_s = 12.0", "gb_s = 0.0");
        let err = GpuTable::parse(&still).unwrap_err().to_string();
        assert!(err.contains("[links.network]"), "{err}");
        let own = BUILT_IN.replace("link_gb_s = 35.0", "link_gb_s = -35.0");
        let err = GpuTable::parse(&own).unwrap_err().to_string();
        assert!(
            err.contains("h100-pcie") && err.contains("link_gb_s"),
            "{err}"
        );
    }
}
