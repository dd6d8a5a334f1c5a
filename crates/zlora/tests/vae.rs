//! AutoencoderKL against the diffusers reference in fixtures/tiny (see fixtures/README.md).

mod common;
mod parity;

use candle_core::{DType, Device, Tensor};
use parity::{assert_within, vae_config as config, vae_errors, TOL};
use zlora::model::vae::{AutoencoderKL, VaeConfig};
use zlora::Error;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn vae() -> zlora::Result<AutoencoderKL> {
    parity::vae(DType::F32)
}

#[test]
fn config_reads_fixture() -> TestResult {
    let cfg = config()?;
    assert_eq!(cfg.spatial_factor(), 4);
    assert_eq!(cfg.shift(), 0.1159);
    assert!(!cfg.use_quant_conv && !cfg.use_post_quant_conv);
    assert_eq!(VaeConfig::z_image().spatial_factor(), 8);
    Ok(())
}

#[test]
fn config_defaults_follow_diffusers() -> TestResult {
    let cfg: VaeConfig =
        serde_json::from_str(r#"{"block_out_channels": [32, 64], "shift_factor": null}"#)?;
    assert!(cfg.use_quant_conv && cfg.use_post_quant_conv && cfg.mid_block_add_attention);
    assert_eq!(cfg.shift(), 0.0);
    assert_eq!(cfg.spatial_factor(), 2);
    Ok(())
}

#[test]
fn encode_and_decode_match_reference() {
    assert_within(&vae_errors(DType::F32), TOL, "f32");
}

#[test]
fn batch_items_are_independent() -> TestResult {
    let reference = common::reference();
    let z = &reference["vae.z_in"];
    let pair = Tensor::cat(&[z, &z.affine(0.5, 0.1)?], 0)?;
    let vae = vae()?;
    let both = vae.decode(&pair)?;
    assert!(common::rel_err(&both.narrow(0, 0, 1)?, &vae.decode(z)?) < 1e-6);
    Ok(())
}

#[test]
fn bf16_request_on_cpu_runs() {
    assert_within(&vae_errors(DType::BF16), TOL, "bf16 request");
}

#[test]
fn transformer_space_is_shift_then_scale() -> TestResult {
    let vae = vae()?;
    let z = Tensor::new(&[0.1159f32, 1.1159, -0.8841], &Device::Cpu)?;
    let zn = vae.to_transformer_space(&z)?;
    let want = Tensor::new(&[0.0f32, 0.3611, -0.3611], &Device::Cpu)?;
    assert!((&zn - &want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
    let back = vae.from_transformer_space(&zn)?;
    assert!((back - z)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> TestResult {
    let vae = vae()?;
    // 50 is not a multiple of the spatial factor 4.
    let odd = Tensor::zeros((1, 3, 50, 80), DType::F32, &Device::Cpu)?;
    assert!(matches!(vae.encode(&odd), Err(Error::Invalid(_))));
    let gray = Tensor::zeros((1, 1, 48, 80), DType::F32, &Device::Cpu)?;
    assert!(matches!(vae.encode(&gray), Err(Error::Invalid(_))));
    let latents = Tensor::zeros((1, 4, 12, 20), DType::F32, &Device::Cpu)?;
    assert!(matches!(vae.decode(&latents), Err(Error::Invalid(_))));
    Ok(())
}

#[test]
fn missing_or_invalid_config_names_the_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    let err = VaeConfig::from_file(&path).err().ok_or("no error")?;
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("config.json"));
    std::fs::write(
        &path,
        r#"{"block_out_channels": [30], "norm_num_groups": 32}"#,
    )?;
    let err = VaeConfig::from_file(&path).err().ok_or("no error")?;
    assert!(matches!(err, Error::BadFile { .. }) && err.to_string().contains("config.json"));
    Ok(())
}
