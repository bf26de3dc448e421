//! The container images as built (DESIGN 6b): OCI image layouts written by
//! `scripts/build-images.sh` into `target/images/<image>` (the test command
//! builds them first). This module reads one the way a runtime would (index,
//! the platform's manifest, config, layers, each blob checked against its
//! digest), lists and unpacks its layers; [`runtime`] runs it with a real
//! OCI runtime.

pub mod runtime;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::distrocache::workspace_root;

/// Largest blob (manifest or config) read into memory.
const MAX_JSON_BLOB: u64 = 1024 * 1024;

/// Where the image layouts are: `DISTROCACHE_IMAGES_DIR`, else
/// `target/images` in the workspace.
pub(crate) fn images_dir() -> PathBuf {
    std::env::var_os("DISTROCACHE_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/images"))
}

/// The architecture of this machine in OCI's words.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// One layer: its blob and what it says about itself.
#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: String,
    pub media_type: String,
    /// Compressed size, as the manifest and the blob agree.
    pub size: u64,
    pub path: PathBuf,
}

/// An entry of a layer's tar stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub kind: tar::EntryType,
}

/// One platform's image from a layout.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub config: Value,
    pub layers: Vec<Layer>,
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        bail!("{digest}: only sha256 digests are expected");
    };
    ensure!(
        hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
        "{digest} is not a sha256 digest"
    );
    Ok(layout.join("blobs/sha256").join(hex))
}

/// Checks a blob's size and digest against its descriptor.
fn verify_blob(layout: &Path, descriptor: &Value) -> Result<PathBuf> {
    let digest = descriptor["digest"]
        .as_str()
        .context("descriptor without digest")?;
    let size = descriptor["size"]
        .as_u64()
        .context("descriptor without size")?;
    let path = blob_path(layout, digest)?;
    let mut file = File::open(&path).with_context(|| format!("blob {digest}"))?;
    let mut hasher = Sha256::new();
    let copied = std::io::copy(&mut file, &mut hasher)?;
    ensure!(
        copied == size,
        "{digest}: {copied} bytes, the descriptor says {size}"
    );
    let actual = format!("sha256:{:x}", hasher.finalize());
    ensure!(actual == digest, "blob {digest} hashes to {actual}");
    Ok(path)
}

fn read_json(layout: &Path, descriptor: &Value) -> Result<Value> {
    let size = descriptor["size"].as_u64().unwrap_or(u64::MAX);
    ensure!(size <= MAX_JSON_BLOB, "a JSON blob of {size} bytes");
    let path = verify_blob(layout, descriptor)?;
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// Opens the image `name` (`cache-node`, `operator`) for `linux/<arch>`.
pub fn open(name: &str, arch: &str) -> Result<Image> {
    let layout = images_dir().join(name);
    let index_path = layout.join("index.json");
    if !index_path.is_file() {
        bail!(
            "{} is missing; build the images first with `bash scripts/build-images.sh` \
             (bash scripts/test.sh does)",
            index_path.display()
        );
    }
    let layout_file: Value = serde_json::from_slice(&std::fs::read(layout.join("oci-layout"))?)?;
    ensure!(
        layout_file["imageLayoutVersion"] == "1.0.0",
        "not an OCI image layout: {layout_file}"
    );
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    // The layout's index names what was pulled: a multi-platform index
    // (what the release pushes) or one image.
    let manifest = loop {
        let manifests = index["manifests"]
            .as_array()
            .context("index without manifests")?;
        let chosen = manifests
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .or_else(|| (manifests.len() == 1).then(|| &manifests[0]))
            .with_context(|| format!("no linux/{arch} image in {}", layout.display()))?
            .clone();
        let media_type = chosen["mediaType"].as_str().unwrap_or_default();
        let blob = read_json(&layout, &chosen)?;
        if media_type.contains("index") || media_type.contains("manifest.list") {
            index = blob;
            continue;
        }
        break blob;
    };
    let config = read_json(&layout, &manifest["config"])?;
    ensure!(
        config["os"] == "linux" && config["architecture"] == arch,
        "the config says {}/{}",
        config["os"],
        config["architecture"]
    );
    let layers = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| {
            Ok(Layer {
                digest: l["digest"].as_str().unwrap_or_default().to_owned(),
                media_type: l["mediaType"].as_str().unwrap_or_default().to_owned(),
                size: l["size"].as_u64().unwrap_or_default(),
                path: verify_blob(&layout, l)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let diff_ids = config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
    ensure!(
        diff_ids == layers.len(),
        "{} layers but {diff_ids} diff_ids",
        layers.len()
    );
    Ok(Image {
        name: name.to_owned(),
        config,
        layers,
    })
}

fn layer_reader(layer: &Layer) -> Result<Box<dyn Read>> {
    let file = File::open(&layer.path)?;
    Ok(
        if layer.media_type.ends_with("+gzip") || layer.media_type.ends_with(".gzip") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else if layer.media_type.ends_with(".tar") {
            Box::new(file)
        } else {
            bail!(
                "{}: layer media type {} is not handled",
                layer.digest,
                layer.media_type
            )
        },
    )
}

impl Image {
    /// The compressed size of all layers: what a node pulls.
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Every entry of every layer, in order.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for layer in &self.layers {
            let mut archive = tar::Archive::new(layer_reader(layer)?);
            for entry in archive.entries()? {
                let entry = entry?;
                let header = entry.header();
                out.push(Entry {
                    path: entry.path()?.to_string_lossy().into_owned(),
                    mode: header.mode()?,
                    uid: header.uid()?,
                    gid: header.gid()?,
                    size: header.size()?,
                    kind: header.entry_type(),
                });
            }
        }
        Ok(out)
    }

    /// Unpacks the layers into `dir` (ownership and modes kept), as a
    /// runtime's root filesystem.
    pub fn unpack(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // The root directory is the container's `/`: its user must be able
        // to walk it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        for layer in &self.layers {
            let mut archive = tar::Archive::new(layer_reader(layer)?);
            archive.set_preserve_permissions(true);
            archive.set_preserve_ownerships(true);
            archive.set_overwrite(true);
            archive
                .unpack(dir)
                .with_context(|| format!("unpack {} into {}", layer.digest, dir.display()))?;
        }
        Ok(())
    }

    /// The config's `User`, as uid and gid.
    pub fn user(&self) -> Result<(u32, u32)> {
        let user = self.config["config"]["User"].as_str().unwrap_or_default();
        let (uid, gid) = user.split_once(':').unwrap_or((user, user));
        Ok((
            uid.parse()
                .with_context(|| format!("User {user:?} is not numeric"))?,
            gid.parse()
                .with_context(|| format!("User {user:?} is not numeric"))?,
        ))
    }

    /// The config's entrypoint.
    pub fn entrypoint(&self) -> Vec<String> {
        strings(&self.config["config"]["Entrypoint"])
    }

    /// The config's exposed ports, sorted (`8080/tcp`).
    pub fn exposed_ports(&self) -> Vec<String> {
        let mut ports: Vec<String> = self.config["config"]["ExposedPorts"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        ports.sort();
        ports
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an ELF executable asks for a dynamic loader (`PT_INTERP`): a
/// static one runs on an empty base image.
pub fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let bytes = std::fs::read(path)?;
    ensure!(
        bytes.len() > 64 && &bytes[..4] == b"\x7fELF",
        "{} is not ELF",
        path.display()
    );
    ensure!(
        bytes[4] == 2 && bytes[5] == 1,
        "only 64-bit little-endian ELF is read"
    );
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| -> Result<usize> {
        let b: [u8; 8] = bytes.get(o..o + 8).context("truncated ELF")?.try_into()?;
        Ok(u64::from_le_bytes(b) as usize)
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type =
            u32::from_le_bytes(bytes.get(ph..ph + 4).context("truncated ELF")?.try_into()?);
        if p_type == 3 {
            let (offset, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let interp = bytes
                .get(offset..offset + size)
                .context("truncated PT_INTERP")?;
            return Ok(Some(
                String::from_utf8_lossy(interp)
                    .trim_end_matches('\0')
                    .to_owned(),
            ));
        }
    }
    Ok(None)
}

/// The final stage of a Dockerfile (after its last `FROM`): its `FROM`
/// image, `USER`, `EXPOSE`d ports (sorted, with `/tcp`) and JSON-form
/// `ENTRYPOINT`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FinalStage {
    pub from: String,
    pub user: String,
    pub exposed_ports: Vec<String>,
    pub entrypoint: Vec<String>,
    /// The `RUN` lines of the earlier stages.
    pub build_runs: Vec<String>,
}

pub fn dockerfile_final_stage(path: &Path) -> Result<FinalStage> {
    let text = std::fs::read_to_string(path)?;
    let mut stage = FinalStage::default();
    let mut runs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => {
                runs.append(&mut stage.build_runs);
                stage = FinalStage {
                    from: rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    ..FinalStage::default()
                };
            }
            "RUN" => stage.build_runs.push(rest.to_owned()),
            "USER" => stage.user = rest.to_owned(),
            "EXPOSE" => stage.exposed_ports.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_owned()
                } else {
                    format!("{p}/tcp")
                }
            })),
            "ENTRYPOINT" => stage.entrypoint = strings(&serde_json::from_str(rest)?),
            _ => {}
        }
    }
    stage.exposed_ports.sort();
    stage.build_runs = runs;
    Ok(stage)
}
