//! Test fixture: `select-runtime` selects `no-such-runtime`, which is never a candidate.

use opensandbox_plugin_sdk::{
    export_policy, Caller, CreateRequest, Policy, RuntimeCandidate, RuntimeDecision,
};

struct Garbage;

impl Policy for Garbage {
    fn select_runtime(
        _request: &CreateRequest,
        _caller: &Caller,
        _candidates: &[RuntimeCandidate],
    ) -> RuntimeDecision {
        RuntimeDecision::Select("no-such-runtime".to_string())
    }
}

export_policy!(Garbage);
