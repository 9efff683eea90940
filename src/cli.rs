//! Command-line interface: subcommands and flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::actions::Phase;

#[derive(Debug, Parser)]
#[command(
    name = "kthw-lab",
    version,
    about = "Kubernetes the Hard Way labs on one Linux host with libvirt/KVM",
    long_about = "Builds multi-node \"Kubernetes the Hard Way\" labs from a scenario file: \
a bridge with NAT, VMs from a cached cloud image, a PKI, an API load balancer, etcd, \
the control plane and workers, bootstrapped over SSH.",
    after_help = "Exit codes: 0 ok, 1 other error, 2 bad scenario, 3 preflight failed, \
4 lab exists, 10 host provisioning, 11 boot/ssh timeout, 12 bootstrap."
)]
pub struct Cli {
    /// Where labs keep their state and the shared download cache
    /// [default: /var/lib/kthw-lab for root, $XDG_STATE_HOME/kthw-lab otherwise]
    #[arg(long, global = true, env = "KTHW_LAB_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// More detail: -v info about each step, -vv debug
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusOutput {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct Connect {
    /// libvirt connection URI
    #[arg(
        long,
        env = "KTHW_LAB_CONNECT",
        default_value = "qemu:///system",
        value_name = "URI"
    )]
    pub connect: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the plan of a scenario (names, addresses, MACs, certificates); changes nothing
    Plan {
        /// Scenario file, e.g. scenarios/2m2w.yaml
        scenario: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create a lab from a scenario, or resume an interrupted create
    Create {
        scenario: PathBuf,
        /// Stop after this phase
        #[arg(long, value_enum, value_name = "PHASE")]
        until: Option<Phase>,
        /// Start at this phase (earlier phases must have completed)
        #[arg(long, value_enum, value_name = "PHASE")]
        from: Option<Phase>,
        #[command(flatten)]
        connect: Connect,
    },
    /// Remove everything a lab owns: domains, disks, bridge, NAT, routes, load balancer
    Destroy {
        /// Lab name or scenario file
        lab: String,
        /// Also delete cached images and binaries shared by all labs
        #[arg(long)]
        purge_cache: bool,
        #[command(flatten)]
        connect: Connect,
    },
    /// Destroy then create again
    Recreate {
        scenario: PathBuf,
        #[arg(long, value_enum, value_name = "PHASE")]
        until: Option<Phase>,
        #[command(flatten)]
        connect: Connect,
    },
    /// Put a lab's VMs back to the state saved right after their first boot
    ///
    /// Each node goes back, in seconds, to the memory and disk `wait-ssh` saved at its
    /// first login: same keys and certificates, nothing bootstrapped. A node without
    /// that saved state boots again instead. Run `create` afterwards to bootstrap again.
    Reset {
        lab: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Bring a stopped lab back (bridge, NAT, load balancer, domains) without bootstrapping
    Start {
        lab: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Shut a lab's VMs down and stop its load balancer
    Stop {
        lab: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// List the labs on this host
    List {
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
    },
    /// Show a lab's nodes, services, etcd and routes
    Status {
        lab: String,
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
        #[command(flatten)]
        connect: Connect,
    },
    /// Open a shell on a node, or run a command there
    Ssh {
        lab: String,
        node: String,
        /// Command to run instead of a shell
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Print the admin kubeconfig of a lab, or write it to a file
    Kubeconfig {
        lab: String,
        /// Write to this file (mode 0600) instead of standard output
        #[arg(long, short = 'w', value_name = "FILE")]
        write: Option<PathBuf>,
    },
    /// Show a node's serial console log
    Logs { lab: String, node: String },
    /// The API load balancer
    Lb {
        #[command(subcommand)]
        command: LbCommand,
    },
    /// Whole-lab checkpoints: every node's memory and disk saved at one instant
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Experiments: scripted faults, probes on a timeline, reports that compare runs
    Experiment {
        #[command(subcommand)]
        command: ExperimentCommand,
    },
    /// Cloud images: list, download, build the offline image, verify
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Certificates of a lab
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The download cache of images and component binaries
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Print shell completions
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Run the load balancer in the foreground from a config file
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show backends, health, connections and bytes
    Status {
        lab: String,
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
    },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Pause every node, save each one's memory and disk, resume them all
    Save {
        lab: String,
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Put every node back to a checkpoint (the host side converged first)
    Restore {
        lab: String,
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// The lab's checkpoints, with their phase, disk use and whether they can be restored
    List {
        lab: String,
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
        #[command(flatten)]
        connect: Connect,
    },
    /// Delete a checkpoint's snapshots and its record
    Delete {
        lab: String,
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Run an experiment file against a lab; writes a report (JSON, SVG, summary)
    Run {
        /// Lab name (see `kthw-lab list`)
        lab: String,
        /// Experiment file, or the name of a shipped one (`kthw-lab experiment list`),
        /// e.g. etcd-member-down
        file: PathBuf,
        /// json: print the report JSON on stdout (the summary still goes to stderr)
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
        #[command(flatten)]
        connect: Connect,
    },
    /// The shipped experiments
    List,
    /// A past run's summary: a run id (see the lab's `experiments/`) or a report path
    Show {
        run: String,
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
        /// Also draw the run's timeline chart (SVG) into this file
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Two runs side by side
    Compare { a: String, b: String },
    /// Undo every fault an experiment left in force on a lab (after a kill, say)
    Clean {
        lab: String,
        #[command(flatten)]
        connect: Connect,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the image catalog and what is cached
    List,
    /// Download and verify an image into the cache
    Pull { name: String },
    /// Build an image from Debian packages (the offline image)
    Build { name: String },
    /// Check a cached image against its pinned sha256
    Verify { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Lint every certificate of a lab against its plan
    Check {
        lab: String,
        #[arg(long, short, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Fill the cache from a directory of already-downloaded files
    Import { dir: PathBuf },
}
