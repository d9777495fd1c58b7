//! The driver's lifecycle against the SDK's native fakes of the host capabilities.

use super::*;
use opensandbox_plugin_sdk::process::CapturedOutput;
use opensandbox_plugin_sdk::{testing, AgentMount};

const ID: &str = "0b6c8f2e-1d2a-4c7e-9f00-112233445566";

fn spec(image: &str) -> InstanceSpec {
    InstanceSpec {
        sandbox_id: ID.to_string(),
        hostname: "web".to_string(),
        image: image.to_string(),
        env: vec![("LANG".to_string(), "C.UTF-8".to_string())],
        agent: AgentMount {
            binary: "/opt/agent".to_string(),
            socket_dir: "/run/agent/web".to_string(),
            args: vec!["--serve".to_string()],
        },
    }
}

fn ubuntu() -> InstanceSpec {
    testing::add_subvolume("images/ubuntu_22.04");
    spec("ubuntu:22.04")
}

#[test]
fn create_needs_the_prepared_image() {
    let err = Namespaces::create(&spec("ubuntu:22.04")).unwrap_err();
    match err {
        DriverError::ImageUnavailable(m) => {
            assert!(m.contains("scripts/build-rootfs.sh ubuntu:22.04"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(testing::subvolumes(), Vec::<String>::new());
    assert_eq!(Namespaces::list_instances(), Ok(vec![]));
}

#[test]
fn create_snapshots_and_records() {
    let instance = Namespaces::create(&ubuntu()).unwrap();
    assert_eq!(instance.id, ID);
    assert_eq!(instance.root_subvolume, format!("sandboxes/{ID}"));
    let root = testing::subvolume(&instance.root_subvolume).unwrap();
    assert_eq!(root.snapshot_of.as_deref(), Some("images/ubuntu_22.04"));
    assert!(!root.read_only);
    let record = record::load(ID).unwrap().unwrap();
    assert_eq!(record.hostname, "web");
    assert_eq!(record.process, None);
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Stopped));
    assert_eq!(
        Namespaces::list_instances(),
        Ok(vec![ManagedInstance {
            id: ID.to_string(),
            sandbox_id: Some(ID.to_string())
        }])
    );
    // A second create of the same sandbox is refused, the first one kept.
    assert!(matches!(
        Namespaces::create(&ubuntu()),
        Err(DriverError::Failed(m)) if m.contains("exists")
    ));
}

#[test]
fn create_refuses_bad_specs() {
    testing::add_subvolume("images/ubuntu_22.04");
    let mut bad_id = spec("ubuntu:22.04");
    bad_id.sandbox_id = "../x".to_string();
    let mut bad_env = spec("ubuntu:22.04");
    bad_env.env.push(("A=B".to_string(), "c".to_string()));
    let mut bad_host = spec("ubuntu:22.04");
    bad_host.hostname = "h".repeat(65);
    let mut bad_agent = spec("ubuntu:22.04");
    bad_agent.agent.binary = "agent".to_string();
    for s in [bad_id, bad_env, bad_host, bad_agent] {
        assert!(
            matches!(Namespaces::create(&s), Err(DriverError::Failed(_))),
            "{s:?}"
        );
    }
    assert_eq!(testing::subvolumes(), vec!["images/ubuntu_22.04"]);
}

#[test]
fn start_runs_bwrap_and_stop_kills_it() {
    testing::set_config([("memory_limit_mib", "256"), ("limits_best_effort", "false")]);
    Namespaces::create(&ubuntu()).unwrap();
    Namespaces::start(ID).unwrap();
    let procs = testing::processes();
    assert_eq!(procs.len(), 1);
    let bwrap = &procs[0];
    assert_eq!(bwrap.program, "/usr/bin/bwrap");
    let root = format!("{}/sandboxes/{ID}", testing::BTRFS_ROOT);
    let agent = AgentMount {
        binary: "/opt/agent".to_string(),
        socket_dir: "/run/agent/web".to_string(),
        args: vec!["--serve".to_string()],
    };
    let env = vec![("LANG".to_string(), "C.UTF-8".to_string())];
    assert_eq!(
        bwrap.args,
        bwrap::argv(&bwrap::Launch {
            root: &root,
            hostname: "web",
            env: &env,
            agent: &agent,
        })
    );
    assert!(bwrap.options.env.is_empty());
    let limits = bwrap.options.limits.clone().unwrap();
    assert_eq!(limits.memory_bytes, Some(256 << 20));
    assert!(!limits.best_effort);
    assert_eq!(
        record::load(ID).unwrap().unwrap().process.as_deref(),
        Some(bwrap.id.as_str())
    );
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Running));

    // Starting a running instance changes nothing.
    Namespaces::start(ID).unwrap();
    assert_eq!(testing::processes().len(), 1);

    Namespaces::stop(ID).unwrap();
    let bwrap = &testing::processes()[0];
    assert_eq!(bwrap.signals, vec![(Signal::Kill, true)]);
    assert!(bwrap.released);
    assert_eq!(record::load(ID).unwrap().unwrap().process, None);
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Stopped));
    // Stopping a stopped instance is fine.
    Namespaces::stop(ID).unwrap();

    // It starts again from the same root.
    Namespaces::start(ID).unwrap();
    assert_eq!(testing::processes().len(), 2);
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Running));
}

#[test]
fn the_host_can_make_the_user_namespace() {
    testing::set_config([("id_map", "0:0:65536")]);
    Namespaces::create(&ubuntu()).unwrap();
    Namespaces::start(ID).unwrap();
    let bwrap = &testing::processes()[0];
    assert_eq!(
        bwrap.options.user_namespace,
        Some(vec![process::IdRange {
            inside: 0,
            outside: 0,
            count: 65536
        }])
    );
    assert!(!bwrap.args.iter().any(|a| a == "--unshare-all"));
    assert!(bwrap.args.iter().any(|a| a == "--unshare-pid"));

    testing::set_config([("user_namespace", "false")]);
    Namespaces::stop(ID).unwrap();
    Namespaces::start(ID).unwrap();
    let bwrap = &testing::processes()[1];
    assert_eq!(bwrap.options.user_namespace, None);
    assert!(!bwrap.args.iter().any(|a| a == "--unshare-all"));
}

#[test]
fn an_ended_sandbox_is_stopped_and_restarts() {
    Namespaces::create(&ubuntu()).unwrap();
    Namespaces::start(ID).unwrap();
    let pid = testing::processes()[0].id.clone();
    testing::set_process_state(&pid, ProcessState::Exited(0));
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Stopped));
    Namespaces::start(ID).unwrap();
    let procs = testing::processes();
    assert!(procs[0].released, "the ended process is forgotten");
    assert_eq!(procs.len(), 2);
    // A process the host no longer knows is simply gone.
    testing::set_process_state(&procs[1].id, ProcessState::Exited(1));
    process::release(&procs[1].id).unwrap();
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Stopped));
    Namespaces::stop(ID).unwrap();
}

#[test]
fn start_reports_a_refused_spawn() {
    Namespaces::create(&ubuntu()).unwrap();
    testing::set_granted_programs(["/usr/bin/sleep"]);
    assert!(matches!(
        Namespaces::start(ID),
        Err(DriverError::Failed(m)) if m.contains("not granted")
    ));
    assert_eq!(record::load(ID).unwrap().unwrap().process, None);
    assert!(testing::processes().is_empty());
}

#[test]
fn start_reports_an_immediate_failure() {
    Namespaces::create(&ubuntu()).unwrap();
    testing::set_spawn_outcome(Some((ProcessState::Exited(1), CapturedOutput::default())));
    let err = Namespaces::start(ID).unwrap_err().to_string();
    assert!(err.contains("bwrap ended at once (Exited(1))"), "{err}");
    assert!(!testing::processes()[0].options.capture_output);
    assert!(testing::processes()[0].released);
    assert_eq!(record::load(ID).unwrap().unwrap().process, None);
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Stopped));
}

#[test]
fn start_and_stop_need_the_instance() {
    assert!(matches!(
        Namespaces::start(ID),
        Err(DriverError::NotFound(_))
    ));
    assert!(matches!(
        Namespaces::stop(ID),
        Err(DriverError::NotFound(_))
    ));
    assert!(matches!(
        Namespaces::start("../x"),
        Err(DriverError::NotFound(_))
    ));
    Namespaces::create(&ubuntu()).unwrap();
    btrfs::delete_subvolume(&root_subvolume(ID)).unwrap();
    assert!(matches!(
        Namespaces::start(ID),
        Err(DriverError::NotFound(_))
    ));
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Missing));
}

#[test]
fn destroy_removes_everything_and_is_idempotent() {
    Namespaces::create(&ubuntu()).unwrap();
    Namespaces::start(ID).unwrap();
    Namespaces::destroy(ID).unwrap();
    assert_eq!(testing::subvolumes(), vec!["images/ubuntu_22.04"]);
    assert_eq!(record::load(ID), Ok(None));
    assert!(testing::processes()[0].released);
    assert_eq!(Namespaces::inspect(ID), Ok(InstanceState::Missing));
    Namespaces::destroy(ID).unwrap();
    Namespaces::destroy("../x").unwrap();
    assert_eq!(Namespaces::inspect("../x"), Ok(InstanceState::Missing));
}

#[test]
fn half_made_instances_are_listed() {
    testing::add_subvolume(&format!("sandboxes/{ID}"));
    testing::add_subvolume(&format!("sandboxes/{ID}/nested"));
    testing::add_subvolume("images/ubuntu_22.04");
    assert_eq!(
        Namespaces::list_instances(),
        Ok(vec![ManagedInstance {
            id: ID.to_string(),
            sandbox_id: Some(ID.to_string())
        }])
    );
    Namespaces::destroy(ID).unwrap();
    assert_eq!(Namespaces::list_instances(), Ok(vec![]));
}

#[test]
fn health_and_capabilities() {
    assert_eq!(Namespaces::health(), Ok(()));
    assert!(!Namespaces::capabilities().resource_limits);
    assert!(!Namespaces::capabilities().network);
    testing::set_config([("cpu_millicores", "500")]);
    assert!(Namespaces::capabilities().resource_limits);
    testing::set_btrfs_granted(false);
    assert!(Namespaces::health().unwrap_err().contains("btrfs"));
    testing::set_config([("bwrap", "bwrap")]);
    assert!(Namespaces::health().unwrap_err().contains("bwrap"));
    assert!(Namespaces::validate_config().is_err());
}
