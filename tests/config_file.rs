//! The configuration as documented, checked against the loader so neither can
//! go stale when a key is added or a default changes: the commented default
//! file the Debian package installs as `/etc/flotilla/flotilla.toml`
//! (`dist/flotilla.toml`) and the reference table in `docs/configuration.md`
//! must each name every key the loader accepts, with its built-in default.

use std::collections::{BTreeMap, BTreeSet};
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

/// The reference's table rows: key → (flag cell, default cell).
fn reference_rows() -> BTreeMap<String, (String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let key = cells[1].trim_matches('`').to_string();
            (key, (cells[2].to_string(), cells[3].to_string()))
        })
        .collect()
}

/// The long flags `flotilla daemon` accepts.
fn daemon_flags() -> BTreeSet<String> {
    use clap::CommandFactory;
    let cli = flotilla::cli::Cli::command();
    let daemon = cli.find_subcommand("daemon").unwrap();
    daemon
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|long| format!("--{long}"))
        .collect()
}

#[test]
fn the_reference_names_every_key_with_its_default_and_flag() {
    let rows = reference_rows();
    let documented: BTreeSet<String> = rows.keys().cloned().collect();
    let keys = loader_keys();
    assert_eq!(
        documented.difference(&keys).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "docs/configuration.md documents keys the loader does not accept"
    );
    assert_eq!(
        keys.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "docs/configuration.md lacks keys the loader accepts: add a row for each"
    );
    let defaults = toml::Table::try_from(Config::default()).unwrap();
    let flags = daemon_flags();
    for (key, (flag, default)) in &rows {
        let expected = match &defaults[key] {
            _ if key == "name" => "host name".to_string(),
            toml::Value::String(s) if s.is_empty() => "empty".to_string(),
            toml::Value::Table(t) if t.is_empty() => "empty".to_string(),
            toml::Value::String(s) => format!("`{s}`"),
            other => format!("`{other}`"),
        };
        assert!(
            default.starts_with(&expected),
            "docs/configuration.md: {key}'s default reads {default:?}, the loader's is {expected}"
        );
        for word in flag.split(|c: char| c == '`' || c.is_whitespace()) {
            if word.starts_with("--") {
                assert!(
                    flags.contains(word),
                    "docs/configuration.md: {key}'s flag {word} is not a flag of flotilla daemon"
                );
            }
        }
    }
}
