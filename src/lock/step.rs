//! What a host's reboot coordinator does next, as a pure function of what
//! it sees: the coordinator ([`super::coordinator`]) gathers [`Facts`], asks
//! [`next`] for one [`Step`], carries it out and looks again. Every rule of a
//! safe reboot lives here, where it is tested without a cluster:
//!
//! 1. After a reboot (the boot id differs from the one the reboot was asked
//!    in): become schedulable, wait until healthy, release the lock, and only
//!    then forget the request.
//! 2. No reboot wanted: a slot this coordinator took in this boot is given
//!    back (the request was withdrawn); a slot taken by hand is left alone.
//! 3. Wanted: wait for the window, take the lock (strategy `lock`), drain,
//!    wait until every movable unit left, then reboot. A drain that does not
//!    finish within `drain_timeout` postpones the reboot, unless forced.

use std::time::Duration;

use super::window::WindowState;
use crate::registry::UnitState;
use crate::registry::lock::{HostUnit, HostView};
use crate::units::UnitName;
use crate::units::placement::{Cluster, Outcome, Placed, decide};

/// What the coordinator does when a reboot is needed (`reboot_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Take a slot of the group's reboot lock first.
    Lock,
    /// Reboot without the lock (still in the window, still drained).
    Reboot,
    /// Never reboot.
    Off,
}

/// This machine's slot in its group's reboot lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// It holds none.
    None,
    /// Someone took one for it by hand (no boot recorded).
    ByHand,
    /// Its coordinator took one in this boot.
    ThisBoot,
    /// Its coordinator took one in an earlier boot: the reboot happened.
    EarlierBoot,
}

/// Why a reboot is wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Reboot even if the drain cannot move every unit in time.
    pub force: bool,
    /// The boot a reboot was asked in, if one was: another boot than this
    /// one means the request was carried out.
    pub asked_in: Option<String>,
}

/// Everything a decision is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The configured strategy.
    pub strategy: Strategy,
    /// The id of this boot.
    pub boot_id: String,
    /// The reboot request, if any.
    pub need: Option<Need>,
    /// The reboot window's state now (`None`: no window configured).
    pub window: Option<WindowState>,
    /// This machine's slot.
    pub hold: Hold,
    /// Whether this machine's drain mark is set.
    pub drained: bool,
    /// How long this coordinator has been waiting for the drain (`None`:
    /// it has not started one).
    pub draining_for: Option<Duration>,
    /// How long a drain may take.
    pub drain_timeout: Duration,
    /// Units that must still leave this machine before it reboots.
    pub moving: Vec<UnitName>,
    /// `Err(why)` until this machine is healthy (see [`health`]).
    pub health: Result<(), String>,
    /// How much longer a postponed reboot waits (`None`: not postponed).
    pub postponed_for: Option<Duration>,
    /// How long ago this coordinator asked for the reboot (`None`: never).
    pub asked_reboot: Option<Duration>,
    /// How long a reboot may take.
    pub reboot_timeout: Duration,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// A reboot is wanted but the window is closed; it opens after this long.
    WaitWindow(Duration),
    /// A postponed reboot waits this much longer.
    Postponed(Duration),
    /// Take a slot of the lock (or record this boot in one taken by hand).
    Acquire,
    /// Set the drain mark: units start moving elsewhere.
    Drain,
    /// Units are still moving.
    WaitDrain(Vec<UnitName>),
    /// The drain timed out: undrain, give the slot back, try again later.
    Postpone(Vec<UnitName>),
    /// Ask systemd to reboot.
    Reboot,
    /// The reboot was asked for; wait for it.
    WaitReboot,
    /// Clear the drain mark: take units again.
    Undrain,
    /// Back from a reboot, not healthy yet.
    WaitHealthy(String),
    /// Give the slot back.
    Release,
    /// Forget the reboot request: it was carried out.
    Forget,
}

/// The next step, by the rules of the module doc.
pub fn next(f: &Facts) -> Step {
    if f.strategy == Strategy::Off {
        return Step::Idle;
    }
    let asked_in_earlier_boot = f
        .need
        .as_ref()
        .and_then(|n| n.asked_in.as_deref())
        .is_some_and(|boot| boot != f.boot_id);
    if f.hold == Hold::EarlierBoot || asked_in_earlier_boot {
        if f.drained {
            return Step::Undrain;
        }
        if let Err(why) = &f.health {
            return Step::WaitHealthy(why.clone());
        }
        if f.hold == Hold::EarlierBoot {
            return Step::Release;
        }
        return Step::Forget;
    }
    let Some(need) = &f.need else {
        if f.hold == Hold::ThisBoot {
            return if f.drained {
                Step::Undrain
            } else {
                Step::Release
            };
        }
        return Step::Idle;
    };
    if let Some(left) = f.postponed_for {
        return Step::Postponed(left);
    }
    let window_closed = match f.window {
        Some(WindowState::Closed(opens_in)) => Some(opens_in),
        _ => None,
    };
    match (f.strategy, &f.hold) {
        (Strategy::Lock, Hold::None) => {
            return match window_closed {
                Some(opens_in) => Step::WaitWindow(opens_in),
                None => Step::Acquire,
            };
        }
        (Strategy::Lock, Hold::ByHand) => return Step::Acquire,
        (Strategy::Reboot, _) if !f.drained && f.asked_reboot.is_none() => {
            if let Some(opens_in) = window_closed {
                return Step::WaitWindow(opens_in);
            }
        }
        _ => {}
    }
    if !f.drained {
        return Step::Drain;
    }
    if !f.moving.is_empty() {
        let timed_out = f.draining_for.is_some_and(|d| d >= f.drain_timeout);
        if !timed_out {
            return Step::WaitDrain(f.moving.clone());
        }
        if !need.force {
            return Step::Postpone(f.moving.clone());
        }
    }
    match f.asked_reboot {
        Some(ago) if ago < f.reboot_timeout => Step::WaitReboot,
        _ => Step::Reboot,
    }
}

/// Why a unit stays on a machine that reboots: it cannot move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stays {
    /// `MachineID=` pins it here.
    Pinned,
    /// `Global=true`: it runs on every machine, this one too.
    Global,
}

/// Splits the units on a draining machine into those that must still leave
/// (everything proposed or claimed here that is neither pinned nor global,
/// including units being stopped) and those that stop with the host.
pub fn drain_progress(view: &HostView) -> (Vec<UnitName>, Vec<(UnitName, Stays)>) {
    let mut moving = Vec::new();
    let mut staying = Vec::new();
    for unit in &view.units {
        match stays(unit) {
            Some(why) => staying.push((unit.name.clone(), why)),
            None => moving.push(unit.name.clone()),
        }
    }
    (moving, staying)
}

fn stays(unit: &HostUnit) -> Option<Stays> {
    let rules = unit.requirements.as_ref()?;
    unit.proposal?;
    if rules.global {
        Some(Stays::Global)
    } else if rules.machine_id.is_some() {
        Some(Stays::Pinned)
    } else {
        None
    }
}

/// Whether this machine is healthy after a boot: in the cluster (`present`:
/// its lease is live) and every unit proposed to it claimed and in its
/// target state ([`UnitState::reached`]) as systemd HERE reports it (`local`,
/// by unit; the store's reports may still be the previous boot's). `Err`
/// says what is still missing.
pub fn health(
    view: &HostView,
    local: &std::collections::BTreeMap<UnitName, UnitState>,
) -> Result<(), String> {
    if !view.present {
        return Err("this machine is not in the cluster yet (no presence)".to_string());
    }
    let mut waiting = Vec::new();
    for unit in &view.units {
        let Some(proposal) = unit.proposal else {
            continue;
        };
        let state = local.get(&unit.name);
        let ready = unit.claimed && state.is_some_and(|s| s.reached(proposal.target));
        if !ready {
            let active = state.map_or("-", |s| s.active.as_str());
            waiting.push(format!("{} is {active}", unit.name));
        }
    }
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!("waiting for {}", waiting.join(", ")))
    }
}

/// Why `unit` (with `rules`) cannot leave machine `here`, for the message
/// of a postponed reboot: the placement decision over the machines that may
/// take work, or, if it would fit somewhere, that it did not get active there.
pub fn explain(
    unit: &UnitName,
    rules: Option<&crate::units::Requirements>,
    view: &crate::registry::lock::PlacementView,
    here: &str,
) -> String {
    let Some(rules) = rules else {
        return format!("{unit}: its unit file is unreadable");
    };
    let placed: Vec<Placed<'_>> = view
        .placed
        .iter()
        .filter(|(_, _, m)| m != here)
        .map(|(name, requirements, machine)| Placed {
            name,
            requirements,
            machine,
        })
        .collect();
    let machines: Vec<_> = view
        .machines
        .iter()
        .filter(|m| m.id != here)
        .cloned()
        .collect();
    let cluster = Cluster {
        machines: &machines,
        placed: &placed,
    };
    match decide(cluster, unit, rules).outcome {
        Outcome::NotPlaceable { reason } => format!("{unit} has nowhere to go: {reason}"),
        Outcome::One { machine, .. } => {
            format!("{unit} did not become active on {machine} in time")
        }
        Outcome::Every { .. } => format!("{unit} is global"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lock::PlacementView;
    use crate::registry::records::{Proposal, Target};
    use crate::units::placement::Machine;
    use crate::units::{Requirements, Unit};
    use std::collections::BTreeMap;

    const MIN: Duration = Duration::from_secs(60);

    fn facts() -> Facts {
        Facts {
            strategy: Strategy::Lock,
            boot_id: "b2".into(),
            need: Some(Need {
                force: false,
                asked_in: None,
            }),
            window: None,
            hold: Hold::None,
            drained: false,
            draining_for: None,
            drain_timeout: 10 * MIN,
            moving: Vec::new(),
            health: Ok(()),
            postponed_for: None,
            asked_reboot: None,
            reboot_timeout: 10 * MIN,
        }
    }

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).unwrap()
    }

    fn rules(xfleet: &str) -> Requirements {
        let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}\n");
        Unit::from_text(&name("x.service"), &text)
            .unwrap()
            .requirements()
            .clone()
    }

    #[test]
    fn the_happy_path_in_order() {
        let mut f = facts();
        assert_eq!(next(&f), Step::Acquire);
        f.hold = Hold::ThisBoot;
        assert_eq!(next(&f), Step::Drain);
        f.drained = true;
        f.draining_for = Some(MIN);
        f.moving = vec![name("web.service")];
        assert_eq!(next(&f), Step::WaitDrain(vec![name("web.service")]));
        f.moving.clear();
        assert_eq!(next(&f), Step::Reboot);
        f.asked_reboot = Some(MIN);
        assert_eq!(next(&f), Step::WaitReboot);
        f.asked_reboot = Some(10 * MIN);
        assert_eq!(next(&f), Step::Reboot, "asks again after reboot_timeout");
        // The new boot: the slot was taken in b1.
        f.hold = Hold::EarlierBoot;
        f.need = Some(Need {
            force: false,
            asked_in: Some("b1".into()),
        });
        f.health = Err("web.service is activating".into());
        assert_eq!(next(&f), Step::Undrain, "schedulable before healthy");
        f.drained = false;
        assert_eq!(
            next(&f),
            Step::WaitHealthy("web.service is activating".into())
        );
        f.health = Ok(());
        assert_eq!(next(&f), Step::Release);
        f.hold = Hold::None;
        assert_eq!(next(&f), Step::Forget);
        f.need = None;
        assert_eq!(next(&f), Step::Idle);
    }

    #[test]
    fn outside_the_window_the_lock_is_not_taken() {
        let mut f = facts();
        f.window = Some(WindowState::Closed(MIN));
        assert_eq!(next(&f), Step::WaitWindow(MIN));
        f.window = Some(WindowState::Open(MIN));
        assert_eq!(next(&f), Step::Acquire);
        // A slot already held carries on even if the window closed meanwhile.
        f.window = Some(WindowState::Closed(MIN));
        f.hold = Hold::ThisBoot;
        assert_eq!(next(&f), Step::Drain);
    }

    #[test]
    fn a_drain_that_times_out_postpones_unless_forced() {
        let mut f = facts();
        f.hold = Hold::ThisBoot;
        f.drained = true;
        f.moving = vec![name("db.service")];
        f.draining_for = Some(10 * MIN);
        assert_eq!(next(&f), Step::Postpone(vec![name("db.service")]));
        f.need.as_mut().unwrap().force = true;
        assert_eq!(next(&f), Step::Reboot);
        f.drained = false;
        f.hold = Hold::None;
        f.postponed_for = Some(MIN);
        assert_eq!(next(&f), Step::Postponed(MIN));
    }

    #[test]
    fn a_withdrawn_request_gives_back_only_its_own_slot() {
        let mut f = facts();
        f.need = None;
        f.hold = Hold::ThisBoot;
        f.drained = true;
        assert_eq!(next(&f), Step::Undrain);
        f.drained = false;
        assert_eq!(next(&f), Step::Release);
        f.hold = Hold::ByHand;
        assert_eq!(next(&f), Step::Idle, "a slot taken by hand is left alone");
        f.need = facts().need;
        assert_eq!(next(&f), Step::Acquire, "adopted when a reboot is wanted");
    }

    #[test]
    fn strategy_reboot_needs_no_lock_and_off_does_nothing() {
        let mut f = facts();
        f.strategy = Strategy::Reboot;
        assert_eq!(next(&f), Step::Drain);
        f.window = Some(WindowState::Closed(MIN));
        assert_eq!(next(&f), Step::WaitWindow(MIN));
        f.window = None;
        f.drained = true;
        assert_eq!(next(&f), Step::Reboot);
        f.need.as_mut().unwrap().asked_in = Some("b1".into());
        assert_eq!(next(&f), Step::Undrain);
        f.drained = false;
        assert_eq!(next(&f), Step::Forget);
        f.strategy = Strategy::Off;
        assert_eq!(next(&f), Step::Idle);
    }

    fn unit(n: &str, xfleet: &str, claimed: bool, target: Option<Target>) -> HostUnit {
        let r = rules(xfleet);
        HostUnit {
            name: name(n),
            proposal: target.map(|target| Proposal {
                hash: Unit::from_text(&name(n), "[Service]\nExecStart=/bin/true\n")
                    .unwrap()
                    .hash(),
                target,
            }),
            claimed,
            requirements: Some(r),
        }
    }

    #[test]
    fn pinned_and_global_units_stay_everything_else_moves() {
        let launched = Some(Target::Launched);
        let view = HostView {
            present: true,
            drained: true,
            units: vec![
                unit("a.service", "", true, launched),
                unit("b.service", "Global=true", true, launched),
                unit(
                    "c.service",
                    &format!("MachineID={}", "f".repeat(32)),
                    true,
                    launched,
                ),
                unit("d.service", "Global=true", true, None),
            ],
        };
        let (moving, staying) = drain_progress(&view);
        assert_eq!(moving, vec![name("a.service"), name("d.service")]);
        assert_eq!(
            staying,
            vec![
                (name("b.service"), Stays::Global),
                (name("c.service"), Stays::Pinned)
            ]
        );
    }

    #[test]
    fn healthy_means_present_and_every_assigned_unit_in_its_state_here() {
        let mut view = HostView {
            present: false,
            drained: false,
            units: vec![
                unit("a.service", "", true, Some(Target::Launched)),
                unit("b.service", "", true, Some(Target::Loaded)),
                unit("gone.service", "", true, None),
            ],
        };
        let mut local = BTreeMap::new();
        assert!(health(&view, &local).unwrap_err().contains("presence"));
        view.present = true;
        assert_eq!(
            health(&view, &local),
            Err("waiting for a.service is -, b.service is -".into())
        );
        let state = |load: &str, active: &str| UnitState {
            load: load.into(),
            active: active.into(),
            sub: String::new(),
        };
        local.insert(name("a.service"), state("loaded", "activating"));
        local.insert(name("b.service"), state("loaded", "inactive"));
        assert_eq!(
            health(&view, &local),
            Err("waiting for a.service is activating".into())
        );
        local.insert(name("a.service"), state("loaded", "active"));
        assert_eq!(health(&view, &local), Ok(()));
        view.units[0].claimed = false;
        assert!(
            health(&view, &local).is_err(),
            "an unclaimed proposal waits"
        );
    }

    #[test]
    fn explains_why_a_unit_cannot_leave() {
        let (a, b, c) = ("a".repeat(32), "b".repeat(32), "c".repeat(32));
        let hello = rules("Conflicts=hello@*.service");
        let machine = |id: &str| Machine {
            id: id.to_string(),
            metadata: BTreeMap::new(),
        };
        let view = PlacementView {
            machines: vec![machine(&b), machine(&c)],
            placed: vec![
                (name("hello@1.service"), hello.clone(), a.clone()),
                (name("hello@2.service"), hello.clone(), b.clone()),
                (name("hello@3.service"), hello.clone(), c.clone()),
            ],
        };
        let why = explain(&name("hello@1.service"), Some(&hello), &view, &a);
        assert!(
            why.starts_with("hello@1.service has nowhere to go"),
            "{why}"
        );
        assert!(why.contains("conflicts with hello@2.service"), "{why}");
        let free = PlacementView {
            placed: view.placed[..2].to_vec(),
            ..view.clone()
        };
        let why = explain(&name("hello@1.service"), Some(&hello), &free, &a);
        assert_eq!(
            why,
            format!("hello@1.service did not become active on {c} in time")
        );
    }
}
