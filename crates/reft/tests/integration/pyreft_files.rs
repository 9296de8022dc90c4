//! pyreft save folders: the real fixture, write → read round trips for every kind, both key
//! spellings, hostile and truncated pickles, and the orthogonal-parametrisation math.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::common::{fixture, max_abs_diff, zip_entries, zip_with_data_pkl};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use reft::adapter::pickle::{read_torch_bytes, read_torch_file, write_torch_file, PickleValue};
use reft::adapter::pyreft::{
    read_pyreft, torch_orthogonal_state, torch_orthogonal_weight, write_pyreft, PyreftIntervention,
};

fn orthonormality_error(r: &Tensor) -> f64 {
    let r = r.to_dtype(DType::F64).unwrap();
    let rr = r.matmul(&r.t().unwrap()).unwrap();
    let eye = Tensor::eye(r.dim(0).unwrap(), DType::F64, &Device::Cpu).unwrap();
    max_abs_diff(&rr, &eye)
}

fn randn(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f64> {
    // Box–Muller: no extra crate needed.
    (0..rows * cols)
        .map(|_| {
            let u1: f64 = rng.gen_range(1e-12..1.0);
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// `[r, d]` with orthonormal rows: the Q of a QR (modified Gram–Schmidt) of a Gaussian matrix.
fn random_r(rng: &mut StdRng, r: usize, d: usize) -> Tensor {
    let mut m = randn(rng, r, d);
    for i in 0..r {
        for _pass in 0..2 {
            for j in 0..i {
                let dot: f64 = (0..d).map(|c| m[i * d + c] * m[j * d + c]).sum();
                for c in 0..d {
                    m[i * d + c] -= dot * m[j * d + c];
                }
            }
        }
        let n: f64 = (0..d)
            .map(|c| m[i * d + c] * m[i * d + c])
            .sum::<f64>()
            .sqrt();
        for c in 0..d {
            m[i * d + c] /= n;
        }
    }
    let v: Vec<f32> = m.into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(v, (r, d), &Device::Cpu).unwrap()
}

fn random_t(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.5f32..0.5)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn make(
    rng: &mut StdRng,
    kind: &str,
    layer: usize,
    component: &str,
    r: usize,
    d: usize,
    b2: bool,
) -> PyreftIntervention {
    let mut params = BTreeMap::new();
    let names: &[&str] = match kind {
        "loreft" | "direft_orth" => &["R", "W", "b"],
        "noreft" if b2 => &["W1", "b1", "W2", "b2"],
        "noreft" | "direft" => &["W1", "b1", "W2"],
        "consreft" | "lobireft" => &["R", "b"],
        k => panic!("{k}"),
    };
    for &n in names {
        let t = match n {
            "R" => random_r(rng, r, d),
            n if n.starts_with('b') => random_t(rng, &[r]),
            _ => random_t(rng, &[r, d]),
        };
        params.insert(n.to_string(), t);
    }
    PyreftIntervention {
        key: format!("layer_{layer}_comp_{component}_unit_pos_nunit_1#0"),
        layer,
        component: component.to_string(),
        kind: kind.to_string(),
        rank: r,
        embed_dim: d,
        params,
    }
}

fn assert_same(a: &PyreftIntervention, b: &PyreftIntervention) {
    assert_eq!(a.layer, b.layer);
    assert_eq!(a.component, b.component);
    assert_eq!(a.kind, b.kind);
    assert_eq!(a.rank, b.rank);
    assert_eq!(a.embed_dim, b.embed_dim);
    assert_eq!(
        a.params.keys().collect::<Vec<_>>(),
        b.params.keys().collect::<Vec<_>>(),
        "{}",
        a.kind
    );
    for (name, t) in &a.params {
        let u = &b.params[name];
        assert_eq!(t.dims(), u.dims(), "{} {name}", a.kind);
        assert_eq!(u.dtype(), DType::F32);
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{} {name}: round trip is not exact",
            a.kind
        );
    }
}

// (1) ---------------------------------------------------------------------------------------------

#[test]
fn reads_the_pyreft_fixture() {
    let dir = fixture("pyreft_adapter");
    let ivs = read_pyreft(&dir).unwrap();
    assert_eq!(ivs.len(), 1);
    let iv = &ivs[0];
    assert_eq!(iv.key, "layer_6_comp_block_output_unit_pos_nunit_1#0");
    assert_eq!(
        (iv.layer, iv.component.as_str(), iv.kind.as_str()),
        (6, "block_output", "loreft")
    );
    assert_eq!((iv.rank, iv.embed_dim), (4, 576));
    assert_eq!(iv.params["R"].dims(), &[4, 576]);
    assert_eq!(iv.params["W"].dims(), &[4, 576]);
    assert_eq!(iv.params["b"].dims(), &[4]);
    for t in iv.params.values() {
        assert_eq!(t.dtype(), DType::F32);
    }
    let err = orthonormality_error(&iv.params["R"]);
    assert!(err < 1e-5, "R Rᵀ − I = {err}");
    // W and b were trained, not zero.
    let (w, b) = (&iv.params["W"], &iv.params["b"]);
    assert!(
        max_abs_diff(w, &w.zeros_like().unwrap()) > 0.0
            && max_abs_diff(b, &b.zeros_like().unwrap()) > 0.0
    );
}

#[test]
fn fixture_pickle_keeps_file_order_and_dtypes() {
    let file = fixture("pyreft_adapter/intkey_layer_6_comp_block_output_unit_pos_nunit_1#0.bin");
    let entries = read_torch_file(&file).unwrap();
    let names: Vec<_> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["weight", "bias", "rotate_layer"]);
    match &entries[2].1 {
        PickleValue::Tensor(t) => assert_eq!((t.dims(), t.dtype()), (&[576, 4][..], DType::F32)),
        v => panic!("{v:?}"),
    }
}

// (2) ---------------------------------------------------------------------------------------------

#[test]
fn every_kind_round_trips_exactly() {
    let mut rng = StdRng::seed_from_u64(7);
    let d = 24;
    let ivs = vec![
        make(&mut rng, "loreft", 2, "block_output", 4, d, false),
        make(&mut rng, "noreft", 2, "block_output", 3, d, true),
        make(&mut rng, "noreft", 3, "mlp_output", 2, d, false),
        make(&mut rng, "direft", 4, "block_output", 5, d, false),
        make(&mut rng, "direft_orth", 5, "attention_output", 4, d, false),
        make(&mut rng, "consreft", 0, "block_input", 1, d, false),
        make(&mut rng, "lobireft", 1, "block_output", 6, d, false),
    ];
    let tmp = tempfile::tempdir().unwrap();
    write_pyreft(tmp.path(), &ivs).unwrap();
    let back = read_pyreft(tmp.path()).unwrap();
    assert_eq!(back.len(), ivs.len());
    for (a, b) in ivs.iter().zip(&back) {
        assert_same(a, b);
    }
    // pyvene numbers a repeated (layer, component) #0, #1, …
    assert_eq!(back[0].key, "layer_2_comp_block_output_unit_pos_nunit_1#0");
    assert_eq!(back[1].key, "layer_2_comp_block_output_unit_pos_nunit_1#1");
    assert_eq!(
        back[4].key,
        "layer_5_comp_attention_output_unit_pos_nunit_1#0"
    );

    // config.json as pyvene writes it.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["mode"], "parallel");
    let reps = cfg["representations"].as_array().unwrap();
    assert!(reps.iter().all(|r| r.as_array().unwrap().len() == 14));
    assert_eq!(
        reps[1],
        serde_json::json!([
            2,
            "block_output",
            "pos",
            1,
            3,
            null,
            null,
            null,
            null,
            null,
            null,
            null,
            null,
            null
        ])
    );
    assert_eq!(
        cfg["intervention_types"][4],
        "<class 'pyreft.interventions.DireftIntervention'>"
    );
    assert_eq!(
        cfg["intervention_types"][3],
        "<class 'pyreft.interventions.NodireftIntervention'>"
    );
    assert_eq!(
        cfg["sorted_keys"][1],
        "layer_2_comp_block_output_unit_pos_nunit_1#1"
    );
    assert_eq!(cfg["intervention_dimensions"][0], d);
    assert_eq!(
        cfg["intervention_constant_sources"]
            .as_array()
            .unwrap()
            .len(),
        ivs.len()
    );

    // Non-LoReFT files hold the module's full state dict, R as PyTorch's parametrisation.
    let lobi = read_torch_file(
        &tmp.path()
            .join("intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin"),
    )
    .unwrap();
    let names: Vec<_> = lobi.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "learned_source",
            "embed_dim",
            "interchange_dim",
            "rotate_layer.parametrizations.weight.original",
            "rotate_layer.parametrizations.weight.0.base"
        ]
    );
    match &lobi[1].1 {
        PickleValue::Tensor(t) => {
            assert_eq!(t.dtype(), DType::I64);
            assert_eq!(t.dims(), &[] as &[usize]);
            assert_eq!(t.to_scalar::<i64>().unwrap(), d as i64);
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn old_key_spelling_and_13_field_representations() {
    let mut rng = StdRng::seed_from_u64(11);
    let ivs = vec![
        make(&mut rng, "loreft", 6, "block_output", 2, 16, false),
        make(&mut rng, "loreft", 6, "block_output", 2, 16, false),
        make(&mut rng, "consreft", 8, "block_output", 3, 16, false),
    ];
    let tmp = tempfile::tempdir().unwrap();
    write_pyreft(tmp.path(), &ivs).unwrap();
    // Rename the files to pyvene ≤ 0.1.4's spelling and write the older config by hand.
    let old = [
        "layer.6.comp.block_output.unit.pos.nunit.1#0",
        "layer.6.comp.block_output.unit.pos.nunit.1#1",
        "layer.8.comp.block_output.unit.pos.nunit.1#0",
    ];
    let new = [
        "layer_6_comp_block_output_unit_pos_nunit_1#0",
        "layer_6_comp_block_output_unit_pos_nunit_1#1",
        "layer_8_comp_block_output_unit_pos_nunit_1#0",
    ];
    for (o, n) in old.iter().zip(&new) {
        std::fs::rename(
            tmp.path().join(format!("intkey_{n}.bin")),
            tmp.path().join(format!("intkey_{o}.bin")),
        )
        .unwrap();
    }
    let cfg = serde_json::json!({
        "intervention_dimensions": [16, 16, 16],
        "intervention_types": [
            "<class 'pyreft.interventions.LoreftIntervention'>",
            "<class 'pyreft.interventions.LoreftIntervention'>",
            "<class 'pyreft.interventions.ConsreftIntervention'>"
        ],
        "mode": "parallel",
        "representations": [
            [6, "block_output", "pos", 1, 2, null, null, null, null, null, null, null, null],
            [6, "block_output", "pos", 1, 2, null, null, null, null, null, null, null, null],
            [8, "block_output", "pos", 1, 3, null, null, null, null, null, null, null, null]
        ],
        "sorted_keys": old,
    });
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let back = read_pyreft(tmp.path()).unwrap();
    assert_eq!(back.len(), 3);
    for ((a, b), k) in ivs.iter().zip(&back).zip(&old) {
        assert_same(a, b);
        assert_eq!(&b.key, k);
    }
}

// (3) ---------------------------------------------------------------------------------------------

/// A torch.save-shaped zip whose data.pkl is `pkl`.
fn zip_with_pickle(path: &Path, pkl: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut zw = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zw.start_file("archive/data.pkl", opts).unwrap();
    zw.write_all(pkl).unwrap();
    zw.start_file("archive/version", opts).unwrap();
    zw.write_all(b"3\n").unwrap();
    zw.finish().unwrap();
}

#[test]
fn pickle_calling_os_system_is_refused() {
    // pickle.dumps of a __reduce__ returning (os.system, ("echo pwned",)), protocol 2.
    let mut pkl =
        b"\x80\x02cos\nsystem\nq\x00X\x0a\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.".to_vec();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("evil.bin");
    zip_with_pickle(&file, &pkl);
    let err = read_torch_file(&file).unwrap_err();
    assert!(matches!(err, reft::Error::BadWeights { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("`os.system`") && msg.contains("refusing"),
        "{msg}"
    );
    assert!(msg.contains("evil.bin"), "{msg}");

    // The same through a folder: the error names the intkey file.
    let mut rng = StdRng::seed_from_u64(1);
    let dir = tmp.path().join("adapter");
    write_pyreft(
        &dir,
        &[make(&mut rng, "loreft", 1, "block_output", 2, 8, false)],
    )
    .unwrap();
    let bin = dir.join("intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin");
    zip_with_pickle(&bin, &pkl);
    let msg = read_pyreft(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("`os.system`") && msg.contains("intkey_layer_1"),
        "{msg}"
    );

    // STACK_GLOBAL (protocol 4) spelling of builtins.eval, inside a would-be state dict.
    pkl = b"\x80\x04\x95\x20\x00\x00\x00\x00\x00\x00\x00}\x8c\x08builtins\x8c\x04eval\x93X\x01\x00\x00\x001\x85R.".to_vec();
    zip_with_pickle(&file, &pkl);
    let msg = read_torch_file(&file).unwrap_err().to_string();
    assert!(msg.contains("`builtins.eval`"), "{msg}");
}

#[test]
fn unknown_opcodes_and_non_dict_pickles_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("x.bin");
    // NEWOBJ (0x81) is not something torch.save writes for tensors.
    zip_with_pickle(&file, b"\x80\x02)\x81.");
    assert!(read_torch_file(&file)
        .unwrap_err()
        .to_string()
        .contains("0x81"));
    // A list at top level.
    zip_with_pickle(&file, b"\x80\x02]q\x00.");
    assert!(read_torch_file(&file)
        .unwrap_err()
        .to_string()
        .contains("not a dict"));
    // A persistent id pointing at a storage record that does not exist.
    let pkl = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.";
    zip_with_pickle(&file, pkl);
    let msg = read_torch_file(&file).unwrap_err().to_string();
    assert!(
        msg.contains("archive/data/0") && msg.contains("missing"),
        "{msg}"
    );
    // A stride-0 view claiming 2^40 elements of a 4-element storage must not allocate them:
    // size (4,) stride (1,) → size (2^40,) stride (0,).
    let (from, to): (&[u8], &[u8]) = (
        b"K\x04\x85K\x01\x85",
        b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85K\x00\x85",
    );
    let at = pkl.windows(from.len()).position(|w| w == from).unwrap();
    let huge = [&pkl[..at], to, &pkl[at + from.len()..]].concat();
    let mut zw = zip::ZipWriter::new(std::fs::File::create(&file).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    zw.start_file("archive/data.pkl", opts).unwrap();
    zw.write_all(&huge).unwrap();
    zw.start_file("archive/data/0", opts).unwrap();
    zw.write_all(&[0u8; 16]).unwrap();
    zw.finish().unwrap();
    let msg = read_torch_file(&file).unwrap_err().to_string();
    assert!(msg.contains("more elements than its storage"), "{msg}");
}

#[test]
fn module_state_dict_metadata_is_accepted() {
    // `nn.Module.state_dict()` pickles as OrderedDict(...) then BUILD {'_metadata': OrderedDict(
    // [('', {'version': 1})])}, as pyreft's save writes for every kind but LoReFT.
    // Exactly what Python's pickle.dumps(d, protocol=2) gives for such a dict.
    let pkl = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00nq\x02K\x07s}q\x03X\x09\x00\x00\x00_metadataq\x04h\x00)Rq\x05X\x00\x00\x00\x00q\x06}q\x07X\x07\x00\x00\x00versionq\x08K\x01sssb.";
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.bin");
    zip_with_pickle(&file, pkl);
    let e = read_torch_file(&file).unwrap();
    assert_eq!(e.len(), 1);
    assert!(matches!(e[0], (ref n, PickleValue::Int(7)) if n == "n"));
    // BUILD on a non-dict (would be __setstate__) is refused.
    zip_with_pickle(&file, b"\x80\x02]}b.");
    assert!(read_torch_file(&file)
        .unwrap_err()
        .to_string()
        .contains("BUILD"));
}

// (4) ---------------------------------------------------------------------------------------------

#[test]
fn truncated_or_corrupt_bin_is_a_clear_error() {
    let src = fixture("pyreft_adapter/intkey_layer_6_comp_block_output_unit_pos_nunit_1#0.bin");
    let bytes = std::fs::read(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cut.bin");
    for len in [
        0,
        1,
        2,
        30,
        100,
        1000,
        bytes.len() / 2,
        bytes.len() - 30,
        bytes.len() - 1,
    ] {
        std::fs::write(&file, &bytes[..len]).unwrap();
        let err = read_torch_file(&file).expect_err("a truncated file must not load");
        assert!(
            matches!(err, reft::Error::BadWeights { .. }),
            "{len}: {err:?}"
        );
        assert!(err.to_string().contains("cut.bin"), "{err}");
    }
    // Flip bytes inside a storage: the CRC check catches it.
    let mut bad = bytes.clone();
    for b in &mut bad[2000..2010] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &bad).unwrap();
    let err = read_torch_file(&file).expect_err("a corrupt file must not load");
    assert!(matches!(err, reft::Error::BadWeights { .. }), "{err:?}");

    // Through a folder.
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixture("pyreft_adapter/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join(src.file_name().unwrap()),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    let msg = read_pyreft(&dir).unwrap_err().to_string();
    assert!(msg.contains("intkey_layer_6"), "{msg}");
}

#[test]
fn mutated_pickles_never_panic() {
    // Every byte of the fixture's data.pkl flipped in a few ways, and every truncation, repacked
    // with valid CRCs so that the interpreter (not the zip check) sees the damage.
    let src = fixture("pyreft_adapter/intkey_layer_6_comp_block_output_unit_pos_nunit_1#0.bin");
    let records = zip_entries(&std::fs::read(&src).unwrap());
    let pkl = records
        .iter()
        .find(|(n, _)| n.ends_with("/data.pkl"))
        .unwrap()
        .1
        .clone();
    let pack = |p: &[u8]| zip_with_data_pkl(&records, p);
    let path = Path::new("mutated.bin");
    let mut errors = 0;
    for i in 0..pkl.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut p = pkl.clone();
            p[i] ^= mask;
            errors += read_torch_bytes(&pack(&p), path).is_err() as usize;
        }
        errors += read_torch_bytes(&pack(&pkl[..i]), path).is_err() as usize;
    }
    assert!(
        errors > pkl.len(),
        "most damage must be detected ({errors})"
    );
}

#[test]
fn config_errors_name_the_problem() {
    let mut rng = StdRng::seed_from_u64(3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_pyreft(
        dir,
        &[make(
            &mut rng,
            "direft_orth",
            2,
            "block_output",
            3,
            12,
            false,
        )],
    )
    .unwrap();
    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();

    // Unknown class.
    std::fs::write(
        &cfg_path,
        cfg.replace("DireftIntervention", "FancyIntervention"),
    )
    .unwrap();
    let msg = read_pyreft(dir).unwrap_err().to_string();
    assert!(msg.contains("FancyIntervention"), "{msg}");

    // Rank in config disagrees with the tensors.
    std::fs::write(&cfg_path, cfg.replace("\n      3,\n", "\n      5,\n")).unwrap();
    let err = read_pyreft(dir).unwrap_err();
    assert!(matches!(err, reft::Error::ShapeMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("intkey_layer_2"), "{err}");

    // Missing file.
    std::fs::write(&cfg_path, &cfg).unwrap();
    std::fs::remove_file(dir.join("intkey_layer_2_comp_block_output_unit_pos_nunit_1#0.bin"))
        .unwrap();
    let msg = read_pyreft(dir).unwrap_err().to_string();
    assert!(
        msg.contains("intkey_layer_2_comp_block_output_unit_pos_nunit_1#0.bin"),
        "{msg}"
    );
}

#[test]
fn writer_refuses_inconsistent_interventions() {
    let mut rng = StdRng::seed_from_u64(5);
    let tmp = tempfile::tempdir().unwrap();
    let mut iv = make(&mut rng, "loreft", 0, "block_output", 2, 8, false);
    iv.params.insert("W".into(), random_t(&mut rng, &[3, 8]));
    assert!(write_pyreft(tmp.path(), &[iv.clone()]).is_err());
    iv.params.insert("W".into(), random_t(&mut rng, &[2, 8]));
    iv.params.insert("R".into(), random_t(&mut rng, &[2, 8])); // not orthonormal
    let msg = write_pyreft(tmp.path(), &[iv.clone()])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("orthonormal"), "{msg}");
    iv.kind = "red".into();
    assert!(write_pyreft(tmp.path(), &[iv])
        .unwrap_err()
        .to_string()
        .contains("red"));
}

// (5) ---------------------------------------------------------------------------------------------

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, m, k) = (a.len(), b.len(), b[0].len());
    (0..n)
        .map(|i| {
            (0..k)
                .map(|j| (0..m).map(|l| a[i][l] * b[l][j]).sum())
                .collect()
        })
        .collect()
}

/// PyTorch's Householder map written out the long way: full reflection matrices multiplied.
#[allow(clippy::needless_range_loop)] // indices mirror the math
fn householder_reference(x: &[Vec<f64>], base: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, k) = (x.len(), x[0].len());
    let mut q: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| (i == j) as u8 as f64).collect())
        .collect();
    for i in 0..k {
        let v: Vec<f64> = (0..n)
            .map(|r| match r.cmp(&i) {
                std::cmp::Ordering::Less => 0.0,
                std::cmp::Ordering::Equal => 1.0,
                std::cmp::Ordering::Greater => x[r][i],
            })
            .collect();
        let tau = 2.0 / v.iter().map(|a| a * a).sum::<f64>();
        let h: Vec<Vec<f64>> = (0..n)
            .map(|r| {
                (0..n)
                    .map(|c| (r == c) as u8 as f64 - tau * v[r] * v[c])
                    .collect()
            })
            .collect();
        q = matmul(&q, &h);
    }
    // First k columns, each times int(X[j, j]).
    let q: Vec<Vec<f64>> = q
        .iter()
        .map(|row| {
            (0..k)
                .map(|j| row[j] * (x[j][j] as f32 as i32 as f64))
                .collect()
        })
        .collect();
    matmul(base, &q)
}

fn to_tensor(m: &[Vec<f64>]) -> Tensor {
    let (n, k) = (m.len(), m[0].len());
    let v: Vec<f32> = m.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap()
}

fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

#[test]
fn parametrisation_matches_explicit_householder_product() {
    // X: [5, 3]; diagonal −1, 1.7 (→ 1), −1.2 (→ −1); strictly-lower entries are the reflectors;
    // the upper triangle must be ignored.
    let x = vec![
        vec![-1.0, 9.0, 9.0],
        vec![0.3, 1.7, -9.0],
        vec![-0.5, 0.25, -1.2],
        vec![0.1, -0.7, 0.4],
        vec![0.8, 0.05, -0.6],
    ];
    let x = to_rows(&to_tensor(&x)); // the f32 values the file would hold
    let eye: Vec<Vec<f64>> = (0..5)
        .map(|i| (0..5).map(|j| (i == j) as u8 as f64).collect())
        .collect();
    let ours = to_rows(&torch_orthogonal_weight(&to_tensor(&x), &to_tensor(&eye)).unwrap());
    let reference = householder_reference(&x, &eye);
    for (a, b) in ours.iter().flatten().zip(reference.iter().flatten()) {
        assert!((a - b).abs() < 1e-6, "{ours:?} vs {reference:?}");
    }
    // Orthonormal columns, as the map promises.
    let rt = to_tensor(&ours);
    assert!(orthonormality_error(&rt.t().unwrap()) < 1e-6);

    // With a non-trivial orthogonal base.
    let mut rng = StdRng::seed_from_u64(9);
    let base = random_r(&mut rng, 5, 5);
    let ours = to_rows(&torch_orthogonal_weight(&to_tensor(&x), &base).unwrap());
    let reference = householder_reference(&x, &to_rows(&base));
    for (a, b) in ours.iter().flatten().zip(reference.iter().flatten()) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn written_state_is_torch_initial_state() {
    // original = −I[:, :r] (the map sends it to I[:, :r]); base orthogonal, base[:, :r] = Rᵀ.
    let mut rng = StdRng::seed_from_u64(13);
    let r = random_r(&mut rng, 4, 40);
    let (original, base) = torch_orthogonal_state(&r).unwrap();
    let o = to_rows(&original);
    for (i, row) in o.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            assert_eq!(v, if i == j { -1.0 } else { 0.0 });
        }
    }
    assert!(orthonormality_error(&base) < 1e-5);
    let rt = torch_orthogonal_weight(&original, &base).unwrap();
    assert_eq!(
        rt.t().unwrap().to_vec2::<f32>().unwrap(),
        r.to_vec2::<f32>().unwrap()
    );
}

#[test]
fn pickle_writer_round_trips_mixed_dtypes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.bin");
    let dev = &Device::Cpu;
    let entries = vec![
        (
            "f".to_string(),
            PickleValue::Tensor(Tensor::new(&[[1.5f32, -2.0], [3.0, 4.25]], dev).unwrap()),
        ),
        (
            "bf".to_string(),
            PickleValue::Tensor(
                Tensor::new(&[1.5f32, -2.0], dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
        ),
        (
            "l".to_string(),
            PickleValue::Tensor(Tensor::new(&[7i64, -9, 1 << 40], dev).unwrap()),
        ),
        (
            "s".to_string(),
            PickleValue::Tensor(Tensor::new(3i64, dev).unwrap()),
        ),
        (
            "e".to_string(),
            PickleValue::Tensor(Tensor::zeros((0, 3), DType::F32, dev).unwrap()),
        ),
    ];
    write_torch_file(&path, &entries).unwrap();
    let back = read_torch_file(&path).unwrap();
    assert_eq!(back.len(), entries.len());
    for ((n1, v1), (n2, v2)) in entries.iter().zip(&back) {
        assert_eq!(n1, n2);
        let (PickleValue::Tensor(a), PickleValue::Tensor(b)) = (v1, v2) else {
            panic!()
        };
        assert_eq!((a.dims(), a.dtype()), (b.dims(), b.dtype()), "{n1}");
        let a = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(a, b, "{n1}");
    }
    // Storages start on 64-byte boundaries, as PyTorch lays them out.
    let mut z = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    for i in 0..z.len() {
        let f = z.by_index(i).unwrap();
        if f.name().contains("/data/") {
            assert_eq!(f.data_start() % 64, 0, "{}", f.name());
            assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        }
    }
}
