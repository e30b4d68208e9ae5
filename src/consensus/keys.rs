//! The store's own keys, one function per key family, so no caller formats them.

/// Where a member publishes the address clients reach it at, so clients can
/// send writes straight to the leader instead of through a follower.
pub fn member_client_addr(name: &str) -> String {
    format!("/flotilla/raft/members/{name}/client_addr")
}

/// Where a member announces what it reads that the first release did not
/// (a comma-separated list, see [`super::node::FEATURE_KEEP_ALIVE_BATCHES`]),
/// so the leader proposes such entries only once every member can read them.
pub fn member_features(name: &str) -> String {
    format!("/flotilla/raft/members/{name}/features")
}
