//! A host's disk: the overlay's upper dir, prepared once before its first boot.
//!
//! Everything that makes a host itself and not the outer machine is written here:
//! its machine-id and hostname, its own ssh host keys (the outer machine's are
//! hidden with overlayfs whiteouts), the lab's key in root's authorized_keys, the
//! flotilla binary and its config, and the systemd configuration that lets many
//! instances share one kernel: a small default target, accounting off, and masks
//! for every unit that would touch kernel-global or outer-machine state. The Raft
//! data dir is on this disk too (never on /run or /tmp, which are tmpfs inside),
//! so it survives `lab kill` + `lab start` and reboots.
//!
//! Directories created in the upper dir copy the mode and owner of the same
//! directory in `/`: overlayfs shows the upper dir's, so `/root` must stay 0700.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::dir::LabDir;
use super::shell;
use super::state::{HostState, LabState};

/// Units masked in every host: they touch state shared with the outer machine
/// (sysctls, kernel modules, binfmt, udev and /dev, clock, special mounts, swap,
/// the real root file system) or would rewrite the machine-id. `timers.target` is
/// masked so the outer machine's enabled timers (fstrim, e2scrub, apt) do not run
/// in every host; a timer started explicitly still works.
pub const MASKED_UNITS: &[&str] = &[
    "systemd-sysctl.service",
    "systemd-timesyncd.service",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup-dev-early.service",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "systemd-pstore.service",
    "systemd-random-seed.service",
    "systemd-firstboot.service",
    "systemd-repart.service",
    "systemd-machine-id-commit.service",
    "systemd-journald-audit.socket",
    "systemd-remount-fs.service",
    "swap.target",
    "timers.target",
    "networking.service",
    "systemd-networkd.service",
    "systemd-networkd-wait-online.service",
];

/// The target every host boots into.
pub const TARGET: &str = "flotilla-lab.target";

/// Where a lab host keeps its certificate, its key and the lab's CA.
const LAB_TLS: &str = "/etc/flotilla/tls";

/// Where the daemon's config lives inside a host.
pub const DAEMON_CONFIG: &str = "/etc/flotilla/flotilla.toml";

/// The daemon's unit as shipped for real hosts; lab hosts run it unchanged.
const FLOTILLA_SERVICE: &str = include_str!("../../dist/flotilla.service");

/// The host key types generated per host. RSA is left out: generating one takes
/// over a second per host, and every ssh client since 2014 speaks ed25519.
const HOST_KEY_TYPES: &[&str] = &["ed25519", "ecdsa"];

/// Files shared by all hosts: the flotilla binary and the lab's ssh key.
pub fn prepare_lab(dir: &LabDir, exe: &Path) -> Result<()> {
    let binary = dir.binary();
    let bin_dir = binary.parent().expect("the binary is inside DIR/bin");
    std::fs::create_dir_all(bin_dir)
        .with_context(|| format!("cannot create {}", bin_dir.display()))?;
    let tmp = binary.with_extension("new");
    std::fs::copy(exe, &tmp).with_context(|| {
        format!(
            "cannot copy {} to {}",
            exe.display(),
            binary.parent().unwrap_or(bin_dir).display()
        )
    })?;
    std::fs::rename(&tmp, &binary)
        .with_context(|| format!("cannot install {}", binary.display()))?;

    let key = dir.ssh_key();
    if !key.exists() {
        let ssh_dir = key.parent().expect("the key is inside DIR/ssh");
        std::fs::create_dir_all(ssh_dir)
            .with_context(|| format!("cannot create {}", ssh_dir.display()))?;
        std::fs::set_permissions(ssh_dir, std::fs::Permissions::from_mode(0o700))?;
        shell::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .args([
                    "-C".as_ref(),
                    "flotilla-lab".as_ref(),
                    "-f".as_ref(),
                    key.as_os_str(),
                ]),
        )?;
    }
    std::fs::create_dir_all(dir.logs())
        .with_context(|| format!("cannot create {}", dir.logs().display()))?;
    Ok(())
}

/// Writes a host's disk from scratch.
pub fn prepare_host(dir: &LabDir, lab: &LabState, host: &HostState) -> Result<()> {
    let name = &host.name;
    let host_dir = dir.hosts().join(name);
    if host_dir.exists() {
        std::fs::remove_dir_all(&host_dir)
            .with_context(|| format!("cannot remove the old disk {}", host_dir.display()))?;
    }
    for path in [dir.upper(name), dir.work(name), dir.root(name)] {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    let disk = Disk {
        upper: dir.upper(name),
    };
    disk.write("etc/machine-id", &format!("{}\n", host.machine_id), 0o444)?;
    disk.write("etc/hostname", &format!("{name}\n"), 0o644)?;
    disk.write("etc/hosts", &hosts_file(lab), 0o644)?;
    disk.systemd()?;
    disk.ssh(dir, host)?;
    disk.flotilla(dir, lab, host)?;
    Ok(())
}

/// The known_hosts lines of a prepared host: each of its host keys under its
/// IP and its name, so `ssh` to either is checked (and a rebuilt lab, with new
/// keys, is not refused by an old entry in the user's own known_hosts).
pub fn known_hosts_lines(dir: &LabDir, host: &HostState) -> Result<String> {
    let mut lines = String::new();
    for kind in HOST_KEY_TYPES {
        let path = dir
            .upper(&host.name)
            .join(format!("etc/ssh/ssh_host_{kind}_key.pub"));
        let public = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut words = public.split_whitespace();
        let (Some(algorithm), Some(key)) = (words.next(), words.next()) else {
            anyhow::bail!("{} is not an ssh public key", path.display());
        };
        lines.push_str(&format!("{},{} {algorithm} {key}\n", host.ip, host.name));
    }
    Ok(lines)
}

/// /etc/hosts: every host by name, and the outer machine as `lab-outer`.
fn hosts_file(lab: &LabState) -> String {
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for h in &lab.hosts {
        text.push_str(&format!("{}\t{}\n", h.ip, h.name));
    }
    text.push_str(&format!("{}\tlab-outer\n", lab.gateway()));
    text
}

/// The upper dir of one host.
struct Disk {
    upper: PathBuf,
}

impl Disk {
    /// The systemd configuration: target, masks, accounting off, the daemon's unit.
    fn systemd(&self) -> Result<()> {
        let units = "etc/systemd/system";
        for unit in MASKED_UNITS {
            self.symlink(&format!("{units}/{unit}"), "/dev/null")?;
        }
        let services = "ssh.service flotilla.service";
        self.write(
            &format!("{units}/{TARGET}"),
            &format!(
                "# Written by `flotilla lab`: what a lab host boots into.\n\
                 [Unit]\n\
                 Description=flotilla lab host\n\
                 Requires=basic.target\n\
                 Wants={services}\n\
                 After=basic.target {services}\n\
                 AllowIsolate=yes\n"
            ),
            0o644,
        )?;
        self.symlink(&format!("{units}/default.target"), TARGET)?;
        // The unit real hosts install, unchanged.
        self.write(
            &format!("{units}/flotilla.service"),
            &format!("# Shipped with flotilla (dist/flotilla.service).\n{FLOTILLA_SERVICE}"),
            0o644,
        )?;
        self.write(
            "etc/systemd/system.conf.d/flotilla-lab.conf",
            "# Written by `flotilla lab`: many systemd instances share this kernel, so\n\
             # none may touch the outer machine's cgroup controllers.\n\
             [Manager]\n\
             DefaultCPUAccounting=no\n\
             DefaultIOAccounting=no\n\
             DefaultIPAccounting=no\n\
             DefaultBlockIOAccounting=no\n\
             DefaultMemoryAccounting=no\n\
             DefaultTasksAccounting=no\n\
             DefaultTimeoutStopSec=10s\n\
             ShowStatus=no\n",
            0o644,
        )?;
        self.write(
            "etc/systemd/journald.conf.d/flotilla-lab.conf",
            "# Written by `flotilla lab`: the journal stays on the host's disk across\n\
             # reboots (and after `lab down --keep-disks`: journalctl -D UPPER/var/log/journal).\n\
             [Journal]\n\
             Storage=persistent\n\
             SystemMaxUse=16M\n\
             RuntimeMaxUse=16M\n",
            0o644,
        )
    }

    /// The host's own ssh host keys, root's authorized_keys and sshd's settings.
    fn ssh(&self, dir: &LabDir, host: &HostState) -> Result<()> {
        self.mkdirs("etc/ssh/sshd_config.d")?;
        let ssh_dir = self.upper.join("etc/ssh");
        let mut ours = Vec::new();
        for kind in HOST_KEY_TYPES {
            let file = format!("ssh_host_{kind}_key");
            let path = ssh_dir.join(&file);
            shell::run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", kind, "-N", "", "-C"])
                    .arg(format!("root@{}", host.name))
                    .arg("-f")
                    .arg(&path),
            )?;
            ours.push(format!("{file}.pub"));
            ours.push(file);
        }
        // The outer machine's host keys must not be readable inside: a whiteout
        // (a 0:0 character device in the upper dir) hides the lower file.
        if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("ssh_host_") && !ours.contains(&name) {
                    shell::run(
                        Command::new("mknod")
                            .arg(ssh_dir.join(&name))
                            .args(["c", "0", "0"]),
                    )
                    .with_context(|| format!("cannot hide the outer machine's {name}"))?;
                }
            }
        }
        let host_keys: String = HOST_KEY_TYPES
            .iter()
            .map(|kind| format!("HostKey /etc/ssh/ssh_host_{kind}_key\n"))
            .collect();
        self.write(
            "etc/ssh/sshd_config.d/flotilla-lab.conf",
            &format!(
                "# Written by `flotilla lab`: this host's own keys only; root by key only.\n\
                 {host_keys}\
                 PermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UseDNS no\n"
            ),
            0o644,
        )?;
        let public = std::fs::read_to_string(dir.ssh_key().with_extension("pub"))
            .context("cannot read the lab's public ssh key")?;
        self.mkdirs("root")?;
        let root_ssh = self.upper.join("root/.ssh");
        std::fs::create_dir_all(&root_ssh)?;
        std::fs::set_permissions(&root_ssh, std::fs::Permissions::from_mode(0o700))?;
        self.write("root/.ssh/authorized_keys", &public, 0o600)
    }

    /// The binary (hard-linked to the lab's copy), its config and its data dir.
    fn flotilla(&self, dir: &LabDir, lab: &LabState, host: &HostState) -> Result<()> {
        self.mkdirs("usr/bin")?;
        let target = self.upper.join("usr/bin/flotilla");
        if std::fs::hard_link(dir.binary(), &target).is_err() {
            std::fs::copy(dir.binary(), &target)
                .with_context(|| format!("cannot copy flotilla to {}", target.display()))?;
        }
        self.mkdirs("var/lib")?;
        let data = self.upper.join("var/lib/flotilla");
        std::fs::create_dir_all(&data)?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        let mut config = toml::Table::new();
        let mut set = |key: &str, value: toml::Value| {
            config.insert(key.to_string(), value);
        };
        set("name", host.name.clone().into());
        set("data_dir", "/var/lib/flotilla".into());
        // Every host shares the kernel's boot id: the lab writes one per boot.
        set("boot_id_file", super::init::BOOT_ID_FILE.into());
        set(
            "ttl_secs",
            i64::try_from(lab.ttl_secs)
                .context("the TTL is too large")?
                .into(),
        );
        // Every host serves the API to the outer machine, with the lab's token.
        set(
            "api_listen",
            format!("0.0.0.0:{}", super::state::API_PORT).into(),
        );
        set("api_token", lab.api_token.clone().into());
        // Mutual TLS on the store: a member certificate for a server, an
        // agent certificate (named by the machine id) for an agent-only host.
        let (tls_name, role) = if host.server {
            (host.name.as_str(), crate::tls::Role::Member)
        } else {
            (host.machine_id.as_str(), crate::tls::Role::Agent)
        };
        self.mkdirs(LAB_TLS.trim_start_matches('/'))?;
        crate::tls::ca::issue(
            tls_name,
            role,
            &dir.tls(),
            &self.upper.join(LAB_TLS.trim_start_matches('/')),
            crate::tls::ca::DEFAULT_DAYS,
        )
        .with_context(|| format!("cannot issue the certificate of {}", host.name))?;
        set(
            "tls_ca",
            format!("{LAB_TLS}/{}", crate::tls::ca::CA_CERT).into(),
        );
        set("tls_cert", format!("{LAB_TLS}/{tls_name}.pem").into());
        set("tls_key", format!("{LAB_TLS}/{tls_name}.key").into());
        if !host.server {
            // An agent-only host: no Raft seat, the servers' store.
            set("endpoints", lab.endpoint().into());
            let text = toml::to_string(&config).context("cannot write the daemon's config")?;
            return self.write(
                DAEMON_CONFIG.trim_start_matches('/'),
                &format!("# Written by `flotilla lab` for {}.\n{text}", host.name),
                0o644,
            );
        }
        set(
            "client_listen",
            format!("0.0.0.0:{}", super::state::CLIENT_PORT).into(),
        );
        set(
            "peer_listen",
            format!("{}:{}", host.ip, super::state::PEER_PORT).into(),
        );
        set("initial_cluster", lab.initial_cluster().into());
        set("initial_cluster_state", "new".into());
        set(
            "election_timeout_ms",
            i64::try_from(lab.election_timeout_ms)
                .context("the election timeout is too large")?
                .into(),
        );
        let text = toml::to_string(&config).context("cannot write the daemon's config")?;
        self.write(
            DAEMON_CONFIG.trim_start_matches('/'),
            &format!("# Written by `flotilla lab` for {}.\n{text}", host.name),
            0o644,
        )
    }

    /// Writes a file, creating its parent directories like the outer machine's.
    fn write(&self, rel: &str, contents: &str, mode: u32) -> Result<()> {
        if let Some(parent) = Path::new(rel).parent() {
            self.mkdirs(&parent.to_string_lossy())?;
        }
        let path = self.upper.join(rel);
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))
    }

    fn symlink(&self, rel: &str, target: &str) -> Result<()> {
        if let Some(parent) = Path::new(rel).parent() {
            self.mkdirs(&parent.to_string_lossy())?;
        }
        let path = self.upper.join(rel);
        std::os::unix::fs::symlink(target, &path)
            .with_context(|| format!("cannot create the symlink {}", path.display()))
    }

    /// Creates `rel` and its parents in the upper dir, each with the mode and owner
    /// of the same directory on the outer machine when it exists there.
    fn mkdirs(&self, rel: &str) -> Result<()> {
        let mut lower = PathBuf::from("/");
        let mut upper = self.upper.clone();
        for part in Path::new(rel).components() {
            lower.push(part);
            upper.push(part);
            if upper.is_dir() {
                continue;
            }
            std::fs::create_dir(&upper)
                .with_context(|| format!("cannot create {}", upper.display()))?;
            if let Ok(meta) = std::fs::metadata(&lower) {
                std::fs::set_permissions(
                    &upper,
                    std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                )?;
                std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))?;
            }
        }
        Ok(())
    }
}
