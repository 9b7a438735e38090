//! The documentation stands alone: every relative link in README.md and
//! docs/*.md resolves to a file in the repository, and none points outside
//! it; the configs the README shows are the ones the tests run.

use std::path::{Path, PathBuf};

/// The Markdown files users read.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![PathBuf::from("README.md"), PathBuf::from("BENCHMARKS.md")];
    for entry in std::fs::read_dir("docs").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    docs
}

/// The targets of `[text](target)` links in `text`.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
        }
    }
    out
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let docs = documents();
    assert!(docs.len() >= 5, "{docs:?}");
    let mut checked = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        assert!(!text.contains("../shared"), "{} points outside the repository", doc.display());
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") || link.starts_with('#') {
                continue;
            }
            let file = link.split('#').next().unwrap();
            let target = doc.parent().unwrap_or(Path::new("")).join(file);
            assert!(target.exists(), "{}: the link {link} resolves to nothing", doc.display());
            let inside = target.canonicalize().unwrap().starts_with(std::env::current_dir().unwrap());
            assert!(inside, "{}: {link} leaves the repository", doc.display());
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} links checked");
}

#[test]
fn the_readme_names_every_doc() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    for doc in documents().iter().filter(|d| d.starts_with("docs")) {
        let name = doc.display().to_string();
        assert!(readme.contains(&format!("]({name})")), "README.md never links {name}");
    }
}

/// The README's balancer snippets are the configs tests/scale_out.rs runs:
/// every line of each (its comment stripped) is in the tested file, a
/// `server` line with its address as the only difference.
#[test]
fn the_readme_fleet_snippets_are_the_tested_configs() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    for (lang, file) in [("nginx", "conf/nginx-fleet.conf"), ("haproxy", "conf/haproxy-fleet.cfg")] {
        let conf = std::fs::read_to_string(file).unwrap();
        let fence = format!("```{lang}\n");
        let start = readme.find(&fence).unwrap_or_else(|| panic!("README.md has no {lang} block")) + fence.len();
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let strip = |l: &str| l.split(" #").next().unwrap().trim().to_string();
        let conf_lines: Vec<String> = conf.lines().map(strip).collect();
        let mut checked = 0;
        for line in block.lines().map(strip).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let found = match line.strip_prefix("server ") {
                // The rest after the address (nginx: `server ADDR ...`;
                // HAProxy: `server NAME ADDR ...`).
                Some(rest) => {
                    let tail = |l: &str| -> Vec<String> {
                        let words: Vec<&str> = l.split_whitespace().collect();
                        let at = words.iter().position(|w| w.contains(':')).unwrap_or(0);
                        words[at + 1..].iter().map(|w| w.to_string()).collect()
                    };
                    let want = tail(rest);
                    conf_lines.iter().filter_map(|l| l.strip_prefix("server ")).any(|c| tail(c) == want)
                }
                None => conf_lines.contains(&line),
            };
            assert!(found, "README.md's {lang} block says `{line}`, which {file} does not");
            checked += 1;
        }
        assert!(checked >= 5, "{lang}: only {checked} lines checked");
    }
}
