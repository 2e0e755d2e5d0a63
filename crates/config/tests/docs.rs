//! docs/config.md documents every key `config.toml` accepts, and its
//! example (with every commented-out key switched on) is a valid config.

use banger_config::Config;
use std::path::Path;

fn doc() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The keys a table accepts, as serde lists them when refusing an unknown one.
fn keys(unknown_in: &str) -> Vec<String> {
    let err = Config::parse(unknown_in, Path::new("c.toml"), Path::new("/home/u"))
        .expect_err("an unknown key is refused")
        .to_string();
    let list = err
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("no key list in {err:?}"))
        .1;
    let keys: Vec<String> = list
        .split(", ")
        .map(|k| k.trim().trim_matches('`').to_string())
        .collect();
    assert!(keys.len() > 1, "{err}");
    keys
}

/// Whether a line of the example sets key (or opens table) `k`.
fn shows(line: &str, k: &str) -> bool {
    line.starts_with(&format!("{k} = "))
        || line.starts_with(&format!("[{k}]"))
        || line.starts_with(&format!("[[{k}]]"))
}

#[test]
fn every_key_has_its_section() {
    let doc = doc();
    for k in keys("no_such_key = 1\n") {
        let named = [format!("`{k}`"), format!("`[{k}]`"), format!("`[[{k}]]`")];
        assert!(
            doc.lines()
                .any(|l| l.starts_with("### ") && named.iter().any(|n| l.contains(n.as_str()))),
            "docs/config.md has no section for {k}"
        );
    }
    for (table, probe) in [
        ("vm_defaults", "[vm_defaults]\nno_such_key = 1\n"),
        (
            "file_sync",
            "[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\nno_such_key = 1\n",
        ),
    ] {
        for k in keys(probe) {
            assert!(
                doc.contains(&format!("| `{k}` |")),
                "docs/config.md has no row for {table}.{k}"
            );
        }
    }
}

#[test]
fn the_example_is_a_valid_config_with_every_key_on() {
    let doc = doc();
    let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let block = &doc[start..start + doc[start..].find("```").expect("its end")];
    Config::parse(block, Path::new("c.toml"), Path::new("/home/u")).expect("as shown");
    let all: String = block
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let cfg = Config::parse(&all, Path::new("c.toml"), Path::new("/home/u"))
        .expect("every key switched on");
    for k in keys("no_such_key = 1\n") {
        assert!(
            all.lines().any(|l| shows(l, &k)),
            "the example does not show {k}"
        );
    }
    assert_eq!(cfg.file_sync.len(), 1);
}
