//! The commented default configuration the Debian package installs as
//! `/etc/flotilla/flotilla.toml` (`dist/flotilla.toml`), checked against the
//! loader: it must name every key the loader accepts, each with its built-in
//! default, so it cannot go stale when a key is added or a default changes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use flotilla::config::{self, Config, Source};

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/flotilla.toml")
}

/// Every key the loader accepts, from the defaults it serialises.
fn loader_keys() -> BTreeSet<String> {
    toml::Table::try_from(Config::default())
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// The file with its commented-out settings (`#key = value`, `#[table]`)
/// turned on; prose comments (`# ...`) stay comments.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn load(text: &str) -> config::Loaded {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(&path, text).unwrap();
    config::load(&Source::Explicit(path), &[], &[])
        .unwrap_or_else(|e| panic!("the loader refuses the file: {e}\n{text}"))
}

#[test]
fn the_shipped_file_changes_nothing() {
    let text = std::fs::read_to_string(shipped()).unwrap();
    assert_eq!(load(&text).config, Config::default());
}

#[test]
fn the_shipped_file_names_every_key_with_its_default() {
    let text = std::fs::read_to_string(shipped()).unwrap();
    let on = uncommented(&text);
    let loaded = load(&on);
    let documented: BTreeSet<String> = loaded.origins.keys().cloned().collect();
    let defaults = toml::Table::try_from(Config::default()).unwrap();
    let missing: Vec<String> = loader_keys()
        .difference(&documented)
        .map(|key| format!("#{key} = {}", defaults[key]))
        .collect();
    assert!(
        missing.is_empty(),
        "dist/flotilla.toml lacks these keys; add them, each with a comment saying what it \
         does:\n{}",
        missing.join("\n")
    );
    // Each value shown is the default (the name's default is the host name,
    // so the file shows an example there).
    let expected = Config {
        name: loaded.config.name.clone(),
        ..Config::default()
    };
    assert_eq!(
        loaded.config, expected,
        "a value in dist/flotilla.toml is not the built-in default"
    );
}
