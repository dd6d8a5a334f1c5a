//! The dataset scan and its preflight report over a folder with one of every problem.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, RgbImage};
use zlora::data::{
    Bucket, Buckets, Dataset, DatasetConfig, MissingCaption, Preflight, ProblemKind, Resolution,
    Severity,
};
use zlora::model::text::PromptTokenizer;

fn tiny_model() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tiny/model"
    ))
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_file(&tiny_model().join("tokenizer/tokenizer.json")).expect("tokenizer")
}

/// The tiny VAE shrinks by 4, so buckets step by 8; at resolution 64 the default min_side is 32.
fn buckets() -> Buckets {
    Buckets::for_vae(64, 4).expect("buckets")
}

fn image(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    }))
}

fn save(dir: &Path, name: &str, img: &DynamicImage, format: ImageFormat) {
    img.save_with_format(dir.join(name), format).expect(name);
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), bytes).expect(name);
}

/// Good items a, b, c, empty; one problem in every other file.
fn problem_folder(dir: &Path) {
    save(dir, "a.png", &image(64, 64), ImageFormat::Png);
    write(dir, "a.txt", "a red square\n");
    save(dir, "b.jpg", &image(128, 64), ImageFormat::Jpeg);
    write(dir, "b.txt", "\u{feff}wide, landscape");
    save(dir, "c.WEBP", &image(48, 96), ImageFormat::WebP);
    write(dir, "c.txt", "tall, zkchar, portrait");
    save(dir, "empty.png", &image(40, 40), ImageFormat::Png);
    write(dir, "empty.txt", "  \n");

    write(dir, "corrupt.png", b"\x89PNG\r\n\x1a\n this is not a png");
    write(dir, "corrupt.txt", "corrupt");
    let mut png = Vec::new();
    image(64, 64)
        .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .expect("png");
    write(dir, "truncated.png", &png[..png.len() / 2]);
    write(dir, "truncated.txt", "truncated");
    save(dir, "small.png", &image(64, 16), ImageFormat::Png);
    write(dir, "small.txt", "too small");
    save(dir, "nocap.png", &image(64, 64), ImageFormat::Png);
    save(dir, "long.png", &image(64, 64), ImageFormat::Png);
    write(dir, "long.txt", "word ".repeat(120));
    save(dir, "dup.png", &image(64, 64), ImageFormat::Png);
    save(dir, "dup.jpg", &image(64, 64), ImageFormat::Jpeg);
    write(dir, "dup.txt", "duplicate");
    save(dir, "latin1.png", &image(64, 64), ImageFormat::Png);
    write(dir, "latin1.txt", b"caf\xe9");

    write(dir, "orphan.txt", "an image that was deleted");
    write(dir, "notes.md", "not part of the dataset");
    write(dir, ".DS_Store", "finder");
    std::fs::create_dir(dir.join("old")).expect("subfolder");
}

fn config(dir: &Path) -> DatasetConfig {
    DatasetConfig {
        resolution: Resolution::One(64),
        trigger: Some("zkchar".into()),
        ..DatasetConfig::new(dir)
    }
}

fn scan(cfg: &DatasetConfig) -> (Dataset, Preflight) {
    Dataset::scan(cfg, &[buckets()], &tokenizer()).expect("scan")
}

fn kinds_of<'a>(report: &'a Preflight, file: &str) -> Vec<(&'a ProblemKind, Severity)> {
    report
        .problems
        .iter()
        .filter(|p| p.file.file_name().and_then(|n| n.to_str()) == Some(file))
        .map(|p| (&p.kind, p.severity))
        .collect()
}

#[test]
fn every_problem_is_reported_by_file_and_stops_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    problem_folder(dir.path());
    let (dataset, report) = scan(&config(dir.path()));
    let text = report.to_string();
    println!("{text}");

    let names: Vec<_> = dataset
        .items()
        .iter()
        .filter_map(|i| i.image.file_name()?.to_str())
        .collect();
    assert_eq!(names, ["a.png", "b.jpg", "c.WEBP", "empty.png"]);
    assert_eq!(report.images, 12);
    assert_eq!(report.usable, 4);
    assert_eq!(report.ignored, 3, "notes.md, .DS_Store and old/");
    assert!(report.is_fatal());

    let error = |file: &str, pred: fn(&ProblemKind) -> bool| {
        let kinds = kinds_of(&report, file);
        assert!(
            kinds.iter().any(|(k, s)| pred(k) && *s == Severity::Error),
            "{file}: {kinds:?}"
        );
        assert!(
            text.contains(&format!("error: {file}: ")),
            "{file} in\n{text}"
        );
    };
    error("corrupt.png", |k| matches!(k, ProblemKind::Unreadable(_)));
    error("truncated.png", |k| matches!(k, ProblemKind::Unreadable(_)));
    error("small.png", |k| matches!(k, ProblemKind::TooSmall { .. }));
    error("nocap.png", |k| {
        matches!(
            k,
            ProblemKind::MissingCaption {
                read_as_empty: false,
                ..
            }
        )
    });
    error("long.txt", |k| {
        matches!(k, ProblemKind::CaptionTooLong { max: 512, .. })
    });
    error("dup.png", |k| {
        matches!(k, ProblemKind::DuplicateStem { .. })
    });
    error("dup.jpg", |k| {
        matches!(k, ProblemKind::DuplicateStem { .. })
    });
    error("latin1.txt", |k| {
        matches!(k, ProblemKind::CaptionUnreadable(_))
    });
    assert_eq!(report.errors().count(), 8);

    assert_eq!(
        kinds_of(&report, "empty.txt"),
        [(&ProblemKind::EmptyCaption, Severity::Warning)]
    );
    assert_eq!(
        kinds_of(&report, "orphan.txt"),
        [(&ProblemKind::OrphanCaption, Severity::Warning)]
    );
    assert!(text.contains("warning: orphan.txt: "), "{text}");
    assert!(text.contains("skip_problems = true"), "{text}");
}

#[test]
fn captions_get_the_trigger_once_and_images_their_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    problem_folder(dir.path());
    let (dataset, _) = scan(&config(dir.path()));
    let caption = |name: &str| {
        let item = dataset.items().iter().find(|i| i.image.ends_with(name));
        item.map(|i| (i.caption.clone(), i.buckets[0], (i.width, i.height)))
            .expect(name)
    };
    let (a, a_bucket, _) = caption("a.png");
    assert_eq!(a, "zkchar, a red square");
    assert_eq!(
        a_bucket,
        Bucket {
            width: 64,
            height: 64
        }
    );
    let (b, b_bucket, b_size) = caption("b.jpg");
    assert_eq!(b, "zkchar, wide, landscape", "byte-order mark dropped");
    assert_eq!(b_size, (128, 64));
    assert!(b_bucket.width > b_bucket.height, "{b_bucket}");
    let (c, c_bucket, _) = caption("c.WEBP");
    assert_eq!(
        c, "tall, zkchar, portrait",
        "trigger already present as a word"
    );
    assert_eq!(
        (c_bucket.width, c_bucket.height),
        (b_bucket.height, b_bucket.width)
    );
    assert_eq!(caption("empty.png").0, "zkchar");
}

#[test]
fn skip_problems_trains_the_good_items_and_labels_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    problem_folder(dir.path());
    let cfg = DatasetConfig {
        skip_problems: true,
        ..config(dir.path())
    };
    let (dataset, report) = scan(&cfg);
    assert_eq!(dataset.len(), 4);
    assert!(!report.is_fatal());
    let text = report.to_string();
    assert!(text.contains("skipped: corrupt.png: "), "{text}");
    assert!(!text.contains("error: "), "{text}");
}

#[test]
fn missing_captions_can_be_read_as_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    save(dir.path(), "one.png", &image(64, 64), ImageFormat::Png);
    save(dir.path(), "two.png", &image(64, 72), ImageFormat::Png);
    write(dir.path(), "two.txt", "second");
    let strict = config(dir.path());
    let (dataset, report) = scan(&strict);
    assert!(report.is_fatal());
    assert_eq!(dataset.len(), 1);

    let lenient = DatasetConfig {
        missing_caption: MissingCaption::Empty,
        ..strict
    };
    let (dataset, report) = scan(&lenient);
    assert!(!report.is_fatal(), "{report}");
    assert_eq!(report.warnings().count(), 1);
    assert_eq!(dataset.items()[0].caption, "zkchar");
    assert_eq!(dataset.items()[1].caption, "zkchar, second");
}

#[test]
fn an_empty_or_missing_folder_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, report) = scan(&config(dir.path()));
    assert!(report.is_fatal());
    assert!(report.to_string().contains("no image can be trained"));

    let missing = config(&dir.path().join("nope"));
    let err = Dataset::scan(&missing, &[buckets()], &tokenizer()).expect_err("no folder");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn the_dataset_table_parses_with_defaults_and_rejects_unknown_keys() {
    let cfg: DatasetConfig =
        serde_json::from_str(r#"{"path": "DIR", "resolution": 768, "trigger": "zkchar"}"#)
            .expect("parse");
    assert_eq!(cfg.resolution, Resolution::One(768));
    assert_eq!(cfg.caption_dropout, 0.05);
    assert_eq!(cfg.repeats, 1);
    assert_eq!(cfg.caption_extension, "txt");
    assert_eq!(cfg.min_side(), 384);
    assert_eq!(cfg.missing_caption, MissingCaption::Error);
    let typo = serde_json::from_str::<DatasetConfig>(r#"{"path": "DIR", "resolutoin": 768}"#);
    assert!(typo.is_err());
    let policy: DatasetConfig =
        serde_json::from_str(r#"{"path": "DIR", "missing_caption": "empty"}"#).expect("parse");
    assert_eq!(policy.missing_caption, MissingCaption::Empty);
}

/// A JPEG as a phone writes it: pixels stored landscape, EXIF orientation 6 (rotate 90°).
fn rotated_jpeg(path: &Path, w: u32, h: u32) {
    use image::{codecs::jpeg::JpegEncoder, ExtendedColorType, ImageEncoder};
    // Big-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1 value = 6.
    let exif = [
        b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0,
    ];
    let file = std::fs::File::create(path).expect("jpeg");
    let mut encoder = JpegEncoder::new(file);
    encoder.set_exif_metadata(exif.to_vec()).expect("exif");
    let pixels = image(w, h).to_rgb8();
    encoder
        .write_image(&pixels, w, h, ExtendedColorType::Rgb8)
        .expect("jpeg");
}

#[test]
fn exif_orientation_is_applied_before_bucketing() {
    let dir = tempfile::tempdir().expect("tempdir");
    rotated_jpeg(&dir.path().join("phone.jpg"), 128, 64);
    write(dir.path(), "phone.txt", "a tall photo");
    let (dataset, report) = scan(&config(dir.path()));
    assert!(!report.is_fatal(), "{report}");
    let item = &dataset.items()[0];
    assert_eq!((item.width, item.height), (64, 128));
    let bucket = item.buckets[0];
    assert!(bucket.height > bucket.width, "{bucket}");
}

/// Masks beside their images are found and counted; a misshapen or unreadable mask is an
/// error on the mask file, a mask without an image a warning; `masks = DIR` reads them from a
/// folder by the image's name instead.
#[test]
fn masks_are_found_checked_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (name, w, h) in [("a", 64, 64), ("b", 128, 64), ("c", 64, 64), ("d", 64, 64)] {
        save(d, &format!("{name}.png"), &image(w, h), ImageFormat::Png);
        write(d, &format!("{name}.txt"), name);
    }
    save(d, "a.mask.png", &image(32, 32), ImageFormat::Png);
    save(d, "b.mask.png", &image(64, 64), ImageFormat::Png);
    write(d, "c.mask.png", b"not a png");
    save(d, "lost.mask.png", &image(8, 8), ImageFormat::Png);
    save(d, "d.mask.png", &image(64, 64), ImageFormat::Png);
    save(d, "d.mask.webp", &image(64, 64), ImageFormat::WebP);
    let (dataset, report) = scan(&config(d));
    assert!(matches!(
        kinds_of(&report, "d.mask.png")[..],
        [(ProblemKind::DuplicateMask { .. }, Severity::Error)]
    ));
    assert_eq!(
        (report.images, report.usable, report.masked),
        (4, 1, 1),
        "{report}"
    );
    assert_eq!(
        kinds_of(&report, "b.mask.png"),
        [(
            &ProblemKind::MaskMismatch {
                mask: (64, 64),
                image: (128, 64)
            },
            Severity::Error
        )]
    );
    assert!(matches!(
        kinds_of(&report, "c.mask.png")[..],
        [(ProblemKind::MaskUnreadable(_), Severity::Error)]
    ));
    assert_eq!(
        kinds_of(&report, "lost.mask.png"),
        [(&ProblemKind::OrphanMask, Severity::Warning)]
    );
    let text = report.to_string();
    assert!(
        text.contains("masks: 1 images have one, 0 have none"),
        "{text}"
    );
    assert!(
        text.contains("error: b.mask.png: mask is 64×64 but its image is 128×64"),
        "{text}"
    );
    let a = dataset.items().iter().find(|i| i.image.ends_with("a.png"));
    assert_eq!(a.and_then(|i| i.mask.clone()), Some(d.join("a.mask.png")));

    let masks = tempfile::tempdir().expect("tempdir");
    save(masks.path(), "d.png", &image(64, 64), ImageFormat::Png);
    let from_folder = DatasetConfig {
        masks: Some(masks.path().to_path_buf()),
        skip_problems: true,
        ..config(d)
    };
    let (dataset, report) = scan(&from_folder);
    assert_eq!(report.masked, 1, "{report}");
    let with_mask: Vec<_> = dataset
        .items()
        .iter()
        .filter_map(|i| i.mask.clone())
        .collect();
    assert_eq!(with_mask, [masks.path().join("d.png")]);
    let empty = tempfile::tempdir().expect("tempdir");
    let unmatched = DatasetConfig {
        masks: Some(empty.path().to_path_buf()),
        ..config(d)
    };
    let (_, report) = scan(&unmatched);
    let warned = report.problems.iter().any(|p| {
        p.kind == ProblemKind::NoMaskMatches
            && p.file == empty.path()
            && p.severity == Severity::Warning
    });
    assert!(warned, "{report}");
    let missing = DatasetConfig {
        masks: Some(d.join("nope")),
        ..config(d)
    };
    let err = Dataset::scan(&missing, &[buckets()], &tokenizer()).expect_err("no masks folder");
    assert!(
        err.to_string().contains("nope") && err.to_string().contains("masks"),
        "{err}"
    );
}

#[test]
fn copies_of_one_picture_under_other_names_are_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The same pixels in two files, and one image that differs from them in a single pixel.
    save(d, "first.png", &image(64, 64), ImageFormat::Png);
    save(d, "second.png", &image(64, 64), ImageFormat::Png);
    let mut nearly = image(64, 64).to_rgb8();
    nearly.put_pixel(3, 5, image::Rgb([1, 2, 3]));
    save(
        d,
        "other.png",
        &DynamicImage::ImageRgb8(nearly),
        ImageFormat::Png,
    );
    for stem in ["first", "second", "other"] {
        write(d, &format!("{stem}.txt"), format!("{stem} caption"));
    }
    let (dataset, report) = scan(&config(d));
    assert_eq!(dataset.len(), 3, "copies still train: {report}");
    assert!(!report.is_fatal(), "{report}");
    let copy_of = |file: &str| match kinds_of(&report, file).as_slice() {
        [(ProblemKind::DuplicateImage { other }, Severity::Warning)] => {
            other.file_name().unwrap().to_string_lossy().into_owned()
        }
        other => panic!("{file}: {other:?}"),
    };
    assert_eq!(copy_of("first.png"), "second.png");
    assert_eq!(copy_of("second.png"), "first.png");
    assert!(kinds_of(&report, "other.png").is_empty(), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("warning: first.png: is the same picture as second.png"),
        "{text}"
    );
}
