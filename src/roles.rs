//! The daemon's long-running roles (agent, reboot coordinator, stale-holder
//! sweeper, scheduler) as one set of tasks, so that none of them can die
//! unnoticed: a role that ends before the daemon is asked to stop — with an
//! error, by a panic or just by returning — is a failure of the whole
//! daemon, which then exits so systemd restarts it ("fail whole").

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

/// What a role's task returns: `Err` with why it could not go on.
pub type RoleResult = Result<(), String>;

/// The running roles, each under a name the logs and the exit use.
#[derive(Default)]
pub struct Roles {
    tasks: JoinSet<RoleResult>,
    names: HashMap<Id, &'static str>,
}

impl Roles {
    /// An empty set.
    pub fn new() -> Roles {
        Roles::default()
    }

    /// Runs `role` as a task named `name` (a noun phrase: "the agent").
    pub fn spawn<F>(&mut self, name: &'static str, role: F)
    where
        F: Future<Output = RoleResult> + Send + 'static,
    {
        let handle = self.tasks.spawn(role);
        self.names.insert(handle.id(), name);
    }

    /// Waits until some role ends and says which and why; never resolves
    /// while every role runs (or when there is none), so it can sit in a
    /// `select!` beside the shutdown signal.
    pub async fn ended(&mut self) -> String {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        match joined {
            Ok((id, Ok(()))) => format!("{} ended unasked", self.name(id)),
            Ok((id, Err(why))) => format!("{} failed: {why}", self.name(id)),
            Err(e) if e.is_panic() => format!("{} panicked", self.name(e.id())),
            Err(e) => format!("{} was cancelled", self.name(e.id())),
        }
    }

    /// After the roles were asked to stop: waits up to `within` for all of
    /// them, logging each one that failed, then abandons the rest.
    pub async fn finish(mut self, within: Duration) {
        let all = async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((id, Err(why))) => tracing::error!("{}: {why}", self.name(id)),
                    Err(e) => tracing::error!("{} failed: {e}", self.name(e.id())),
                }
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            let left: Vec<&str> = self.names.values().copied().collect();
            tracing::error!(
                "not stopped within {} s: {}",
                within.as_secs(),
                left.join(", ")
            );
        }
    }

    /// The name of the task `id`, forgotten as the task is done.
    fn name(&mut self, id: Id) -> &'static str {
        self.names.remove(&id).unwrap_or("a role")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_role_that_fails_returns_or_panics_is_named() {
        let mut roles = Roles::new();
        roles.spawn("the failing one", async {
            Err("no machine id".to_string())
        });
        assert_eq!(roles.ended().await, "the failing one failed: no machine id");

        roles.spawn("the quitter", async { Ok(()) });
        assert_eq!(roles.ended().await, "the quitter ended unasked");

        roles.spawn("the crasher", async { panic!("boom") });
        assert_eq!(roles.ended().await, "the crasher panicked");
    }

    #[tokio::test]
    async fn running_roles_and_no_roles_never_end() {
        let mut none = Roles::new();
        let waited = tokio::time::timeout(Duration::from_millis(50), none.ended()).await;
        assert!(waited.is_err(), "an empty set must not end");

        let mut roles = Roles::new();
        roles.spawn("the runner", std::future::pending());
        let waited = tokio::time::timeout(Duration::from_millis(50), roles.ended()).await;
        assert!(waited.is_err(), "a running role must not end the set");
    }

    #[tokio::test]
    async fn finish_waits_for_roles_that_stop_and_gives_up_on_the_others() {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let mut roles = Roles::new();
        roles.spawn("the polite one", async move {
            let _ = stopped.changed().await;
            let _ = done_tx.send(());
            Ok(())
        });
        roles.spawn("the stubborn one", std::future::pending());
        stop.send(true).unwrap();
        roles.finish(Duration::from_millis(100)).await;
        assert!(done_rx.await.is_ok(), "the polite role ran to its end");
    }
}
