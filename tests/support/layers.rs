//! The layering check shared by the crates' `tests/layers.rs`: every
//! `crate::<module>` path in a crate's sources (outside comments) must
//! point to its own module or to a lower layer. A module missing from the
//! table fails too, so a new module gets a place in the diagram.

use std::path::{Path, PathBuf};

/// `layers`: (module, layer), lower layers first. `exempt`: files (relative
/// to `src/`) or folders not checked (binaries, the crate root).
pub fn check(src: &Path, layers: &[(&str, u32)], exempt: &[&str]) {
    let layer = |m: &str| layers.iter().find(|(n, _)| *n == m).map(|(_, l)| *l);
    let mut files = Vec::new();
    walk(src, &mut files);
    assert!(
        files.len() > 5,
        "found only {} sources under {}",
        files.len(),
        src.display()
    );
    let mut wrong = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if exempt
            .iter()
            .any(|e| rel == *e || rel.starts_with(&format!("{e}/")))
        {
            continue;
        }
        let me = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let Some(mine) = layer(&me) else {
            wrong.push(format!("{rel}: module `{me}` has no layer in the table"));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for target in targets(code) {
                if target == me {
                    continue;
                }
                match layer(&target) {
                    Some(l) if l < mine => {}
                    Some(l) => wrong.push(format!(
                        "{rel}:{}: `{me}` (layer {mine}) uses `{target}` (layer {l}): only lower layers",
                        n + 1
                    )),
                    None => wrong.push(format!(
                        "{rel}:{}: `{me}` uses `crate::{target}`, which is not a module in the table \
                         (name the module, not a re-export at the crate root)",
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering:\n{}", wrong.join("\n"));
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The first component of every `crate::` path on a line, `crate::{a, b::c}` included.
fn targets(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `m2n_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let body = group.split('}').next().unwrap_or("");
            out.extend(body.split(',').filter_map(|item| ident(item.trim())));
        } else if let Some(name) = ident(rest) {
            out.push(name);
        }
    }
    out
}

fn ident(s: &str) -> Option<String> {
    let name: String = s
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

#[test]
fn the_scanner_sees_every_form() {
    assert_eq!(targets("use crate::transport::Region;"), ["transport"]);
    assert_eq!(
        targets("use crate::{proto::Flag, comm};"),
        ["proto", "comm"]
    );
    assert_eq!(
        targets("x: crate::stream::Kind, y: crate::Comm"),
        ["stream", "Comm"]
    );
    assert!(targets("let v = my_crate::x;").is_empty());
}
