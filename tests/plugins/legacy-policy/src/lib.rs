//! Test fixture: a policy built against the `0.1.0` contract (the frozen copy in `wit/`) with
//! wit-bindgen directly, not the SDK, as a plugin built before `0.1.1` was; the host must
//! keep loading it.
//!
//! With a label `runtime` on the request: selects that runtime when it is a candidate,
//! otherwise rejects the creation saying why. Without the label: abstains.

wit_bindgen::generate!({
    world: "policy-plugin",
    path: "wit",
});

use exports::opensandbox::plugin::policy::{
    Caller, CreateRequest, Guest, RuntimeCandidate, RuntimeDecision,
};

struct LegacyPolicy;

impl Guest for LegacyPolicy {
    fn validate_config() -> Result<(), String> {
        Ok(())
    }

    fn select_runtime(
        request: CreateRequest,
        _caller: Caller,
        candidates: Vec<RuntimeCandidate>,
    ) -> RuntimeDecision {
        let Some((_, wanted)) = request.labels.iter().find(|(k, _)| k == "runtime") else {
            return RuntimeDecision::Abstain;
        };
        if candidates.iter().any(|c| &c.name == wanted) {
            RuntimeDecision::Select(wanted.clone())
        } else {
            RuntimeDecision::Reject(format!(
                "legacy-policy: runtime {wanted:?} (label runtime) is not a candidate"
            ))
        }
    }
}

export!(LegacyPolicy);
