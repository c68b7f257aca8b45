//! Command plans of the zfs driver, against a recording runner with canned `zfs` answers.

use std::time::Duration;

use coppice_lifecycle::backend::{
    BackendError, LayerId, LayerKind, RootfsSpec, SandboxId, Storage,
};

use super::testing::RecordingRunner;
use super::{CommandOutput, ZfsConfig, ZfsStorage};

const GET: &str = "zfs get -H -p -r -o name,property,value,source type,origin,coppice:state,mountpoint,used,usedbydataset,referenced tank/c";

fn layer(s: &str) -> LayerId {
    LayerId::new(s).unwrap()
}

fn sandbox(s: &str) -> SandboxId {
    SandboxId::new(s).unwrap()
}

/// `zfs get` lines for one dataset or snapshot.
fn row(name: &str, origin: &str, state: &str, used: u64) -> String {
    let snapshot = name.contains('@');
    let mountpoint = if snapshot {
        "-".to_owned()
    } else {
        format!("/mnt/{name}")
    };
    [
        (
            "type",
            if snapshot { "snapshot" } else { "filesystem" }.to_owned(),
        ),
        ("origin", origin.to_owned()),
        ("coppice:state", state.to_owned()),
        ("mountpoint", mountpoint),
        ("used", used.to_string()),
        ("usedbydataset", (used / 2).to_string()),
        ("referenced", (used * 10).to_string()),
    ]
    .iter()
    .map(|(p, v)| format!("{name}\t{p}\t{v}\tlocal\n"))
    .collect()
}

/// The root and its three children, as `open` leaves them.
fn layout() -> String {
    [
        "tank/c",
        "tank/c/templates",
        "tank/c/sandboxes",
        "tank/c/retired",
    ]
    .iter()
    .map(|n| row(n, "-", "-", 1))
    .collect()
}

/// A layout with a complete template `base`.
fn with_base() -> String {
    layout()
        + &row("tank/c/templates/base", "-", "ready", 1000)
        + &row("tank/c/templates/base@sealed", "-", "-", 0)
}

fn config() -> ZfsConfig {
    let mut c = ZfsConfig::new("tank/c");
    c.busy_backoff = vec![Duration::from_millis(1); 3];
    c
}

/// Opens a storage whose first inventories answer `inventory`, then forgets those calls.
async fn open_with(inventory: &str) -> ZfsStorage<RecordingRunner> {
    let runner = RecordingRunner::new();
    runner.on(GET, CommandOutput::ok(inventory));
    runner.on(GET, CommandOutput::ok(inventory));
    runner.on(GET, CommandOutput::ok(inventory));
    let storage = ZfsStorage::open(config(), runner).await.unwrap();
    storage.runner().clear_calls();
    storage
}

fn busy(name: &str) -> CommandOutput {
    CommandOutput::failed(format!("cannot destroy '{name}': dataset is busy"))
}

#[tokio::test]
async fn open_creates_the_layout_on_an_empty_pool() {
    let runner = RecordingRunner::new();
    runner.on(
        GET,
        CommandOutput::failed("cannot open 'tank/c': dataset does not exist"),
    );
    runner.always(GET, CommandOutput::ok(layout()));
    let storage = ZfsStorage::open(config(), runner).await.unwrap();
    assert_eq!(
        storage.runner().calls(),
        [
            GET,
            "zfs create -p tank/c",
            "zfs create -p tank/c/templates",
            "zfs create -p tank/c/sandboxes",
            "zfs create -p tank/c/retired",
            GET,
            GET,
        ]
    );
}

#[tokio::test]
async fn open_destroys_half_made_objects_and_unmounts_retired_ones() {
    let crashed = with_base()
        + &row("tank/c/templates/half", "-", "-", 5)
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            5,
        )
        + &row("tank/c/sandboxes/a@halfsnap", "-", "-", 5)
        + &row("tank/c/sandboxes/a@good", "-", "ready", 5)
        + &row("tank/c/sandboxes/b", "tank/c/templates/base@sealed", "-", 5)
        + &row(
            "tank/c/sandboxes/r",
            "tank/c/templates/base@sealed",
            "retired",
            5,
        )
        + &row("tank/c/sandboxes/r@keep", "-", "ready", 5)
        + &row(
            "tank/c/retired/old-1",
            "tank/c/templates/base@sealed",
            "retired",
            5,
        );
    // What is left once the half-made objects are gone.
    let after = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            5,
        )
        + &row("tank/c/sandboxes/a@good", "-", "ready", 5)
        + &row(
            "tank/c/sandboxes/r",
            "tank/c/templates/base@sealed",
            "retired",
            5,
        )
        + &row("tank/c/sandboxes/r@keep", "-", "ready", 5)
        + &row(
            "tank/c/retired/old-1",
            "tank/c/templates/base@sealed",
            "retired",
            5,
        );
    let runner = RecordingRunner::new();
    runner.on(GET, CommandOutput::ok(&crashed));
    runner.on(GET, CommandOutput::ok(&crashed));
    runner.on(GET, CommandOutput::ok(&after));
    let storage = ZfsStorage::open(config(), runner).await.unwrap();
    assert_eq!(
        storage.runner().calls(),
        [
            GET,
            GET,
            "zfs destroy -r tank/c/templates/half",
            "zfs destroy -r tank/c/sandboxes/b",
            "zfs destroy tank/c/sandboxes/a@halfsnap",
            GET,
            "zfs destroy -r tank/c/retired/old-1",
            "zfs set mountpoint=none tank/c/sandboxes/r",
        ]
    );
}

#[tokio::test]
async fn import_template_seals_the_dataset_and_marks_it_ready_last() {
    let storage = open_with(&layout()).await;
    let src = tempfile::tempdir().unwrap();
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(layout()));
    runner.on(
        "zfs get -H -p -o value mountpoint",
        CommandOutput::ok("/mnt/tank/c/templates/base\n"),
    );
    runner.on(GET, CommandOutput::ok(with_base()));
    let info = storage
        .import_template(&layer("base"), src.path())
        .await
        .unwrap();
    assert_eq!(info.kind, LayerKind::Template);
    assert_eq!(info.parent, None);
    assert_eq!(info.disk_bytes, 1000);
    assert_eq!(
        runner.calls(),
        [
            GET.to_owned(),
            "zfs create tank/c/templates/base".into(),
            "zfs get -H -p -o value mountpoint tank/c/templates/base".into(),
            format!(
                "cp -a {}/. /mnt/tank/c/templates/base/",
                src.path().display()
            ),
            "zfs set readonly=on tank/c/templates/base".into(),
            "zfs snapshot tank/c/templates/base@sealed".into(),
            "zfs set coppice:state=ready tank/c/templates/base".into(),
            GET.into(),
        ]
    );
}

#[tokio::test]
async fn a_failed_import_destroys_what_it_created() {
    let storage = open_with(&layout()).await;
    let src = tempfile::tempdir().unwrap();
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(layout()));
    runner.on(
        "zfs get -H -p -o value mountpoint",
        CommandOutput::ok("/mnt/t\n"),
    );
    runner.on("cp ", CommandOutput::failed("cp: No space left on device"));
    let err = storage
        .import_template(&layer("base"), src.path())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Command { stderr, .. } if stderr.contains("No space")),
        "{err:?}"
    );
    let calls = runner.calls();
    assert_eq!(
        calls.last().unwrap(),
        "zfs destroy -r tank/c/templates/base"
    );
    assert!(!calls.iter().any(|c| c.contains("coppice:state=ready")));
}

#[tokio::test]
async fn import_refuses_bad_sources_and_taken_names_before_running_anything() {
    let storage = open_with(&with_base()).await;
    let runner = storage.runner();
    let missing = storage
        .import_template(&layer("x"), std::path::Path::new("/no/such/rootfs"))
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, BackendError::NotFound { kind: "template source", id } if id == "/no/such/rootfs"),
        "{missing:?}"
    );
    assert!(runner.calls().is_empty());

    runner.always(GET, CommandOutput::ok(with_base()));
    let src = tempfile::tempdir().unwrap();
    let taken = storage
        .import_template(&layer("base"), src.path())
        .await
        .unwrap_err();
    assert!(
        matches!(taken, BackendError::AlreadyExists { kind: "layer", .. }),
        "{taken:?}"
    );
    assert_eq!(runner.calls(), [GET]);
}

#[tokio::test]
async fn create_rootfs_clones_the_layer_with_the_ready_mark_in_one_step() {
    let storage = open_with(&with_base()).await;
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(with_base()));
    runner.on(
        GET,
        CommandOutput::ok(
            with_base()
                + &row(
                    "tank/c/sandboxes/a",
                    "tank/c/templates/base@sealed",
                    "ready",
                    0,
                ),
        ),
    );
    let spec = storage
        .create_rootfs(&sandbox("a"), &layer("base"))
        .await
        .unwrap();
    assert_eq!(
        spec,
        RootfsSpec::Directory("/mnt/tank/c/sandboxes/a".into())
    );
    assert_eq!(
        runner.calls(),
        [
            GET,
            "zfs clone -o coppice:state=ready -o readonly=off tank/c/templates/base@sealed tank/c/sandboxes/a",
            GET,
        ]
    );
}

#[tokio::test]
async fn unknown_layers_and_sandboxes_are_typed_errors_that_change_nothing() {
    let storage = open_with(&with_base()).await;
    let runner = storage.runner();
    runner.always(GET, CommandOutput::ok(with_base()));
    let err = storage
        .create_rootfs(&sandbox("a"), &layer("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::NotFound { kind: "layer", id } if id == "nope"),
        "{err:?}"
    );
    for r in [
        storage
            .snapshot(&sandbox("zz"), &layer("s"))
            .await
            .map(drop),
        storage.remove_rootfs(&sandbox("zz")).await,
        storage.rootfs(&sandbox("zz")).await.map(drop),
        storage.usage(&sandbox("zz")).await.map(drop),
    ] {
        assert!(
            matches!(
                r,
                Err(BackendError::NotFound {
                    kind: "sandbox",
                    ..
                })
            ),
            "{r:?}"
        );
    }
    assert!(matches!(
        storage.delete_layer(&layer("nope")).await,
        Err(BackendError::NotFound { kind: "layer", .. })
    ));
    assert!(
        runner.calls().iter().all(|c| c == GET),
        "{:?}",
        runner.calls()
    );
}

#[tokio::test]
async fn snapshot_is_marked_ready_after_it_is_taken() {
    let live = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            0,
        );
    let storage = open_with(&live).await;
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(&live));
    runner.on(
        GET,
        CommandOutput::ok(live.clone() + &row("tank/c/sandboxes/a@s1", "-", "ready", 70)),
    );
    let info = storage.snapshot(&sandbox("a"), &layer("s1")).await.unwrap();
    assert_eq!(info.kind, LayerKind::Snapshot);
    assert_eq!(info.parent, Some(layer("base")));
    assert_eq!(info.disk_bytes, 70);
    assert_eq!(
        runner.calls(),
        [
            GET,
            "zfs snapshot tank/c/sandboxes/a@s1",
            "zfs set coppice:state=ready tank/c/sandboxes/a@s1",
            GET,
        ]
    );
}

#[tokio::test]
async fn removing_a_sandbox_without_layers_destroys_it_retrying_while_busy() {
    let live = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            0,
        );
    let storage = open_with(&live).await;
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(&live));
    runner.on("zfs destroy", busy("tank/c/sandboxes/a"));
    runner.on("zfs destroy", busy("tank/c/sandboxes/a"));
    storage.remove_rootfs(&sandbox("a")).await.unwrap();
    assert_eq!(
        runner.calls(),
        [
            GET,
            "zfs destroy -r tank/c/sandboxes/a",
            "zfs destroy -r tank/c/sandboxes/a",
            "zfs destroy -r tank/c/sandboxes/a",
        ]
    );
}

#[tokio::test]
async fn busy_retries_are_bounded() {
    let live = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            0,
        );
    let storage = open_with(&live).await;
    let runner = storage.runner();
    runner.always(GET, CommandOutput::ok(&live));
    runner.always("zfs destroy", busy("tank/c/sandboxes/a"));
    let err = storage.remove_rootfs(&sandbox("a")).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Command { stderr, .. } if stderr.contains("busy")),
        "{err:?}"
    );
    // One try plus one per configured backoff step.
    let destroys = runner
        .calls()
        .iter()
        .filter(|c| c.starts_with("zfs destroy"))
        .count();
    assert_eq!(destroys, 1 + config().busy_backoff.len());
}

#[tokio::test]
async fn removing_a_sandbox_with_layers_retires_it_in_place() {
    let live = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            0,
        )
        + &row("tank/c/sandboxes/a@s1", "-", "ready", 70)
        + &row("tank/c/sandboxes/f", "tank/c/sandboxes/a@s1", "ready", 0);
    let storage = open_with(&live).await;
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(&live));
    storage.remove_rootfs(&sandbox("a")).await.unwrap();
    assert_eq!(
        runner.calls(),
        [
            GET,
            "zfs set coppice:state=retired tank/c/sandboxes/a",
            "zfs set mountpoint=none tank/c/sandboxes/a",
        ]
    );

    // Retired: not a sandbox any more, but its layer stays, with its parent.
    let retired = live.replace("a\tcoppice:state\tready", "a\tcoppice:state\tretired");
    runner.always(GET, CommandOutput::ok(&retired));
    assert_eq!(storage.sandboxes().await.unwrap(), [sandbox("f")]);
    let layers = storage.layers().await.unwrap();
    let s1 = layers.iter().find(|l| l.id == layer("s1")).unwrap();
    assert_eq!(s1.parent, Some(layer("base")));
}

#[tokio::test]
async fn deleting_a_layer_in_use_names_every_dependent() {
    let tree = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            0,
        )
        + &row("tank/c/sandboxes/a@s1", "-", "ready", 70)
        + &row("tank/c/sandboxes/fork", "tank/c/sandboxes/a@s1", "ready", 0)
        + &row(
            "tank/c/sandboxes/r",
            "tank/c/templates/base@sealed",
            "retired",
            0,
        )
        + &row("tank/c/sandboxes/r@k", "-", "ready", 70);
    let storage = open_with(&tree).await;
    let runner = storage.runner();
    runner.always(GET, CommandOutput::ok(&tree));
    let err = storage.delete_layer(&layer("base")).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse { kind: "layer", id, dependents }
            if id == "base" && dependents == &["sandbox a", "sandbox fork", "layer k", "layer s1"]),
        "{err:?}"
    );
    let err = storage.delete_layer(&layer("s1")).await.unwrap_err();
    assert_eq!(err.to_string(), "layer \"s1\" is in use by sandbox fork");
    assert!(
        runner.calls().iter().all(|c| c == GET),
        "{:?}",
        runner.calls()
    );
}

#[tokio::test]
async fn deleting_the_last_layer_of_a_retired_sandbox_destroys_the_sandbox() {
    let one = with_base()
        + &row(
            "tank/c/sandboxes/r",
            "tank/c/templates/base@sealed",
            "retired",
            0,
        )
        + &row("tank/c/sandboxes/r@k", "-", "ready", 70);
    let two = one.clone() + &row("tank/c/sandboxes/r@k2", "-", "ready", 70);
    let storage = open_with(&two).await;
    let runner = storage.runner();
    runner.on(GET, CommandOutput::ok(&two));
    storage.delete_layer(&layer("k2")).await.unwrap();
    runner.on(GET, CommandOutput::ok(&one));
    storage.delete_layer(&layer("k")).await.unwrap();
    assert_eq!(
        runner.calls(),
        [
            GET,
            "zfs destroy tank/c/sandboxes/r@k2",
            GET,
            "zfs destroy -r tank/c/sandboxes/r",
        ]
    );
}

#[tokio::test]
async fn reusing_the_id_of_a_retired_sandbox_moves_it_out_of_the_way() {
    let tree = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "retired",
            0,
        )
        + &row("tank/c/sandboxes/a@s1", "-", "ready", 70)
        + &row("tank/c/sandboxes/f", "tank/c/sandboxes/a@s1", "ready", 0);
    let storage = open_with(&tree).await;
    let runner = storage.runner();
    runner.always(GET, CommandOutput::ok(&tree));
    runner.on(
        "zfs rename",
        CommandOutput::failed("cannot rename 'tank/c/sandboxes/a': dataset is busy"),
    );
    runner.always("zfs rename", busy("tank/c/sandboxes/a"));
    let err = storage
        .create_rootfs(&sandbox("a"), &layer("base"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse { kind: "sandbox id", dependents, .. } if dependents == &["layer s1"]),
        "{err:?}"
    );
    assert!(!runner.calls().iter().any(|c| c.starts_with("zfs clone")));

    let runner2 = RecordingRunner::new();
    for _ in 0..3 {
        runner2.on(GET, CommandOutput::ok(&tree));
    }
    let storage = ZfsStorage::open(config(), runner2).await.unwrap();
    storage.runner().clear_calls();
    storage.runner().on(GET, CommandOutput::ok(&tree));
    // The final inventory does not show the new sandbox, so create reports it missing; the
    // plan up to the clone is what this test is about.
    let _ = storage.create_rootfs(&sandbox("a"), &layer("base")).await;
    let calls = storage.runner().calls();
    assert!(
        calls[1].starts_with("zfs rename tank/c/sandboxes/a tank/c/retired/a-"),
        "{calls:?}"
    );
    assert_eq!(
        calls[2],
        "zfs clone -o coppice:state=ready -o readonly=off tank/c/templates/base@sealed tank/c/sandboxes/a"
    );
}

#[tokio::test]
async fn usage_reads_the_clone_and_its_origin() {
    let live = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            300,
        );
    let storage = open_with(&live).await;
    storage.runner().always(GET, CommandOutput::ok(&live));
    let u = storage.usage(&sandbox("a")).await.unwrap();
    // `row` writes usedbydataset = used / 2 and referenced = used * 10.
    assert_eq!(u.written_bytes, 150);
    assert_eq!(u.shared_bytes, 0);
    let live = live.replace(
        "tank/c/templates/base@sealed\treferenced\t0",
        "tank/c/templates/base@sealed\treferenced\t4096",
    );
    storage.runner().always(GET, CommandOutput::ok(&live));
    storage.runner().on(GET, CommandOutput::ok(&live));
    assert_eq!(
        storage.usage(&sandbox("a")).await.unwrap().shared_bytes,
        4096
    );
}

#[tokio::test]
async fn invalid_root_datasets_are_rejected_before_any_command() {
    for bad in ["", "/tank", "tank/", "tank//c", "tank/c@snap", "tank/c d"] {
        let runner = RecordingRunner::new();
        let mut c = config();
        c.root = bad.into();
        let err = ZfsStorage::open(c, runner).await.unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::InvalidSpec {
                    field: "zfs root dataset",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn an_inherited_ready_mark_does_not_make_a_layer() {
    // zfs-fuse shows a snapshot the user properties of its dataset as inherited.
    let tree = with_base()
        + &row(
            "tank/c/sandboxes/a",
            "tank/c/templates/base@sealed",
            "ready",
            0,
        )
        + &row("tank/c/sandboxes/a@half", "-", "-", 0).replace(
            "coppice:state\t-\tlocal",
            "coppice:state\tready\tinherited from tank/c/sandboxes/a",
        );
    let storage = open_with(&tree).await;
    storage.runner().always(GET, CommandOutput::ok(&tree));
    let ids: Vec<_> = storage
        .layers()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(ids, [layer("base")]);
}
