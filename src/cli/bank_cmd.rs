//! `illmrec bank build|inspect`.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};
use illmrec::store::bank::{write_bank, Bank, BankRows, DType, Modality};
use illmrec::store::npy::{NpyArray, NpyData};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum BankCommand {
    /// Build a bank from an N×D .npy matrix (f32 or f16) and N item ids.
    Build(BuildArgs),
    /// Print a bank's header and verify its checksum.
    Inspect {
        /// The bank file.
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct BuildArgs {
    /// N×D feature matrix (.npy, float32 or float16, C order).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "images",
        conflicts_with = "images"
    )]
    npy: Option<PathBuf>,
    /// Item ids: a .npy integer vector or a text file with one id per line, in row order.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "images",
        conflicts_with = "images"
    )]
    ids: Option<PathBuf>,
    /// Image folder(s) or files instead of --npy/--ids: encoded by the runtime's MobileNet into
    /// an img bank, ids from the file names (`123.jpg`) or from --map.
    #[arg(long, value_name = "DIR|FILE", num_args = 1..)]
    images: Vec<PathBuf>,
    /// With --images: one `ID,FILE` per line, FILE relative to the image folder.
    #[arg(long, value_name = "FILE", requires = "images")]
    map: Option<PathBuf>,
    /// With --images: images encoded at the same time [default: all cores].
    #[arg(long, requires = "images")]
    threads: Option<usize>,
    /// Which modality the features are: img, cf or text (--images: img).
    #[arg(long, required_unless_present = "images")]
    modality: Option<String>,
    /// Storage precision of the rows: f32 or f16 [default: that of the .npy].
    #[arg(long)]
    dtype: Option<String>,
    /// Output bank file (written atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub fn run(cmd: BankCommand) -> Result<()> {
    match cmd {
        BankCommand::Build(a) => build(a),
        BankCommand::Inspect { file } => inspect(&file),
    }
}

fn build(a: BuildArgs) -> Result<()> {
    let inputs: Vec<&Path> = (a.npy.iter().chain(&a.ids).chain(&a.images).chain(&a.map))
        .map(PathBuf::as_path)
        .collect();
    illmrec::store::fsutil::refuse_input_as_output(&a.out, "--out", &inputs)?;
    if !a.images.is_empty() {
        return build_from_images(a);
    }
    let (npy, ids_path) = (a.npy.clone().unwrap(), a.ids.clone().unwrap());
    let modality = Modality::parse(a.modality.as_deref().unwrap_or_default())?;
    let matrix = NpyArray::read(&npy)?;
    ensure!(
        matrix.shape.len() == 2,
        "{}: expected an N×D matrix, found shape {:?}",
        npy.display(),
        matrix.shape
    );
    let (n, dim) = (matrix.shape[0], matrix.shape[1]);
    let ids = read_ids(&ids_path)?;
    ensure!(
        ids.len() == n,
        "{} has {} ids but {} has {n} rows",
        ids_path.display(),
        ids.len(),
        npy.display()
    );
    let dtype = match (&a.dtype, &matrix.data) {
        (Some(d), _) => DType::parse(d)?,
        (None, NpyData::F16(_)) => DType::F16,
        (None, _) => DType::F32,
    };
    let values: Vec<f32> = match &matrix.data {
        NpyData::F32(v) => v.clone(),
        NpyData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        NpyData::I64(_) => bail!("{}: features must be float32 or float16", npy.display()),
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: row {} has a NaN or infinite value",
            npy.display(),
            i / dim
        );
    }
    write(&a.out, modality, dim, &ids, &values, dtype)
}

fn build_from_images(a: BuildArgs) -> Result<()> {
    if let Some(m) = &a.modality {
        ensure!(
            Modality::parse(m)? == Modality::Img,
            "--images builds an img bank, not {m}"
        );
    }
    let e = super::images_cmd::encode(&a.images, a.map.as_deref(), a.threads)?;
    let dtype = match &a.dtype {
        Some(d) => DType::parse(d)?,
        None => DType::F32,
    };
    write(&a.out, Modality::Img, e.dim, &e.ids, &e.rows, dtype)
}

fn write(
    out: &Path,
    modality: Modality,
    dim: usize,
    ids: &[u64],
    values: &[f32],
    dtype: DType,
) -> Result<()> {
    let n = ids.len();
    let header = match dtype {
        DType::F32 => write_bank(out, modality, dim, ids, BankRows::F32(values))?,
        DType::F16 => {
            let halves: Vec<half::f16> = values.iter().map(|v| half::f16::from_f32(*v)).collect();
            write_bank(out, modality, dim, ids, BankRows::F16(&halves))?
        }
    };
    println!(
        "wrote {} ({modality}, {n} items × {dim}, {})",
        out.display(),
        dtype.name()
    );
    println!("checksum {}", illmrec::store::fsutil::hex(&header.checksum));
    Ok(())
}

fn read_ids(path: &Path) -> Result<Vec<u64>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let arr = NpyArray::read(path)?;
        let NpyData::I64(v) = arr.data else {
            bail!("{}: ids must be an integer array", path.display())
        };
        return v
            .into_iter()
            .map(|x| {
                u64::try_from(x).with_context(|| format!("{}: negative id {x}", path.display()))
            })
            .collect();
    }
    let text = illmrec::store::fsutil::read_regular_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            l.trim().parse().with_context(|| {
                format!(
                    "{} line {}: '{}' is not an item id",
                    path.display(),
                    n + 1,
                    l.trim()
                )
            })
        })
        .collect()
}

fn inspect(path: &Path) -> Result<()> {
    let bank = Bank::open(path)?;
    let h = &bank.header;
    println!("file      {}", path.display());
    println!("format    ILLMBANK v{}", h.version);
    println!("modality  {}", bank.modality);
    println!("dtype     {}", bank.dtype.name());
    println!("dim       {}", h.dim);
    println!("count     {}", h.count);
    if let (Some(first), Some(last)) = (bank.ids().first(), bank.ids().last()) {
        println!("ids       {first} .. {last}");
    }
    println!("size      {} bytes", h.file_len);
    println!("checksum  {}", bank.checksum_hex());
    bank.verify()?;
    println!("verified  ok");
    Ok(())
}
