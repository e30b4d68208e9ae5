//! Shell completions and manual pages, generated from the clap definitions in
//! [`crate::cli`], so they list exactly the verbs and flags the binary has.
//! The Debian package (`scripts/deb.sh`) installs what these produce.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// The name the completions and pages are written for.
const BIN: &str = "flotilla";

/// Writes the completion script for `shell`.
pub fn completion(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), BIN, out);
}

/// Writes the top-level manual page, `flotilla(1)`.
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// Writes `flotilla.1` and one `flotilla-VERB.1` per visible verb (nested
/// verbs too, e.g. `flotilla-member-add.1`) into `dir`.
pub fn man_pages(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        write(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// The verbs a user sees in `flotilla --help`.
    fn visible_verbs() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_string())
            .collect()
    }

    #[test]
    fn every_shell_completes_every_visible_verb() {
        let verbs = visible_verbs();
        assert!(verbs.contains(&"list-machines".to_string()), "{verbs:?}");
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = text(|out| completion(shell, out));
            for verb in &verbs {
                assert!(script.contains(verb.as_str()), "{shell}: no {verb}");
            }
        }
    }

    #[test]
    fn the_man_page_names_the_verbs() {
        let page = text(|out| man_page(out).unwrap());
        assert!(
            page.starts_with(".ie") || page.contains(".TH flotilla 1"),
            "{page}"
        );
        for verb in visible_verbs() {
            assert!(page.contains(&verb.replace('-', "\\-")), "no {verb}");
        }
        assert!(!page.contains("init\\-host"), "hidden verbs stay hidden");
    }

    #[test]
    fn one_page_per_verb() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        for page in ["flotilla.1", "flotilla-start.1", "flotilla-member-add.1"] {
            assert!(dir.path().join(page).is_file(), "{page}");
        }
        assert!(!dir.path().join("flotilla-man.1").exists());
    }
}
