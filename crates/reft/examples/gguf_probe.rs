fn main() {
    let p = std::env::args().nth(1).unwrap();
    let g = reft::weights::GgufFile::open(std::path::Path::new(&p)).unwrap();
    let mut v: Vec<_> = g
        .content
        .tensor_infos
        .iter()
        .filter(|(n, _)| n.starts_with("blk.0.") || !n.starts_with("blk"))
        .collect();
    v.sort_by_key(|(n, _)| n.to_string());
    for (n, i) in v {
        println!("{n} {:?} {:?}", i.ggml_dtype, i.shape);
    }
    let mut keys: Vec<_> = g
        .content
        .metadata
        .keys()
        .filter(|k| !k.contains("tokens") && !k.contains("merges") && !k.contains("token_type"))
        .collect();
    keys.sort();
    for k in keys {
        println!("{k} = {:?}", g.content.metadata[k]);
    }
}
