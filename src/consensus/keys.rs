//! The store's own keys, one function per key family, so no caller formats them.

/// Where a member publishes the address clients reach it at, so clients can
/// send writes straight to the leader instead of through a follower.
pub fn member_client_addr(name: &str) -> String {
    format!("/flotilla/raft/members/{name}/client_addr")
}
