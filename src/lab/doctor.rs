//! Every capability the lab needs, checked for real, and the Debian packages it
//! installs when they are missing.
//!
//! The checks try the thing itself where that is cheap (a throwaway namespace, an
//! overlay mount over `/`, a bridge and a veth pair, a probe cgroup) rather than
//! guessing from kernel versions, and each failure says what to do. Tests run
//! `lab doctor` first and fail when it fails: a lab test never skips silently.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use super::cgroup;
use super::shell;

/// The Debian packages the lab needs, with a file each one provides.
pub const PACKAGES: &[(&str, &str)] = &[
    ("systemd", "/lib/systemd/systemd"),
    ("dbus", "/usr/bin/dbus-daemon"),
    ("iproute2", "/usr/sbin/ip"),
    ("openssh-server", "/usr/sbin/sshd"),
    ("openssh-client", "/usr/bin/ssh-keygen"),
    ("util-linux", "/usr/bin/unshare"),
];

/// One check's outcome: what was found, or what is wrong and how to fix it.
struct Check {
    name: &'static str,
    outcome: Result<String, String>,
}

/// `lab doctor`: prints every check; fails when any failed.
pub fn run(dir: &Path) -> Result<ExitCode> {
    let checks = check_all(dir);
    for check in &checks {
        match &check.outcome {
            Ok(found) => println!("ok    {:<12} {found}", check.name),
            Err(problem) => println!("FAIL  {:<12} {problem}", check.name),
        }
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.outcome.is_err())
        .map(|c| c.name)
        .collect();
    if !failed.is_empty() {
        bail!(
            "the lab cannot run here: {} failed (see above)",
            failed.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Fails with every problem named unless all checks pass (used by `lab up`).
pub fn require(dir: &Path) -> Result<()> {
    let problems: Vec<String> = check_all(dir)
        .into_iter()
        .filter_map(|c| c.outcome.err().map(|p| format!("{}: {p}", c.name)))
        .collect();
    if !problems.is_empty() {
        bail!("the lab cannot run here: {}", problems.join("; "));
    }
    Ok(())
}

fn check_all(dir: &Path) -> Vec<Check> {
    let root = check("root", root);
    // Without root every other check fails for that one reason.
    if root.outcome.is_err() {
        return vec![root];
    }
    vec![
        root,
        check("packages", packages),
        check("namespaces", namespaces),
        check("overlayfs", || overlayfs(dir)),
        check("cgroups", cgroups),
        check("network", network),
    ]
}

fn check(name: &'static str, f: impl FnOnce() -> Result<String, String>) -> Check {
    Check { name, outcome: f() }
}

fn root() -> Result<String, String> {
    match shell::effective_uid() {
        Ok(0) => Ok("running as root".to_string()),
        Ok(uid) => Err(format!(
            "running as uid {uid}; the lab mounts, makes namespaces and cgroups: run it as root"
        )),
        Err(err) => Err(format!("{err:#}")),
    }
}

fn packages() -> Result<String, String> {
    let missing = missing_packages();
    if missing.is_empty() {
        let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        return Ok(names.join(" "));
    }
    Err(format!(
        "missing {}; fix: apt-get install -y {} (or `flotilla lab up`, which installs them)",
        missing.join(" "),
        missing.join(" ")
    ))
}

/// The packages whose files are not there.
pub fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect()
}

/// Installs the missing packages with apt-get, saying so on stderr.
pub fn ensure_packages() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if shell::effective_uid()? != 0 {
        bail!(
            "the lab needs the Debian packages {}; run as root, or: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    super::say(&format!(
        "installing missing Debian packages: {}",
        missing.join(" ")
    ));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            // apt's progress goes to stderr: stdout belongs to the lab's JSON.
            .stdout(std::io::stderr())
            .status()
            .context("cannot run apt-get (is this Debian?)")?;
        if !status.success() {
            bail!("`apt-get {}` failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    let still = missing_packages();
    if !still.is_empty() {
        bail!(
            "installed {} but still missing files of {}",
            missing.join(" "),
            still.join(" ")
        );
    }
    Ok(())
}

fn namespaces() -> Result<String, String> {
    shell::run(Command::new("unshare").args([
        "--pid", "--mount", "--uts", "--net", "--ipc", "--fork", "true",
    ]))
    .map(|_| "pid, mount, uts, net and ipc namespaces can be made".to_string())
    .map_err(|err| format!("{err:#}; the kernel or a sandbox forbids new namespaces"))
}

/// Mounts an overlay over `/` with its upper dir in the lab's directory, in a
/// throwaway mount namespace: exactly what a host's root is.
fn overlayfs(dir: &Path) -> Result<String, String> {
    let probe = probe_dir(dir).map_err(|e| format!("{e:#}"))?;
    let result = (|| {
        for sub in ["upper", "work", "merged"] {
            std::fs::create_dir_all(probe.join(sub))
                .map_err(|e| format!("cannot create {}: {e}", probe.join(sub).display()))?;
        }
        let options = format!(
            "lowerdir=/,upperdir={},workdir={}",
            probe.join("upper").display(),
            probe.join("work").display()
        );
        shell::run(
            Command::new("unshare")
                .args([
                    "--mount", "mount", "-t", "overlay", "overlay", "-o", &options,
                ])
                .arg(probe.join("merged")),
        )
        .map_err(|err| {
            format!(
                "{err:#}; overlayfs with / as lower dir and an upper dir under {} must work \
                 (try `modprobe overlay`, or a --dir on ext4 or xfs)",
                dir.display()
            )
        })
    })();
    let _ = std::fs::remove_dir_all(&probe);
    result.map(|_| {
        format!(
            "an overlay over / with its upper dir under {}",
            dir.display()
        )
    })
}

fn probe_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the lab directory {}", dir.display()))?;
    Ok(dir.join(format!(".doctor-{}", std::process::id())))
}

fn cgroups() -> Result<String, String> {
    let layout = cgroup::detect().map_err(|e| format!("{e:#}"))?;
    let probe = format!("flotilla-lab-doctor-{}", std::process::id());
    let result = layout
        .create(&probe)
        .map_err(|e| format!("{e:#}; the cgroup hierarchies must be writable by root"));
    let _ = layout.remove(&probe, std::time::Duration::from_secs(1));
    result?;
    let roots: Vec<String> = layout
        .managed
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Ok(format!(
        "{} layout; hosts get cgroups in {}",
        layout.kind,
        roots.join(" and ")
    ))
}

fn network() -> Result<String, String> {
    shell::run_with_input(
        Command::new("unshare").args(["--net", "ip", "-batch", "-"]),
        Some(
            "link add b0 type bridge\nlink add v0 type veth peer name v1\nlink set v0 master b0\n",
        ),
    )
    .map(|_| "bridges and veth pairs can be made".to_string())
    .map_err(|err| format!("{err:#}; the kernel needs bridge and veth support"))
}
