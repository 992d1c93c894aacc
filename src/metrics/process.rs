//! The standard `process_*` metrics, read from /proc at each scrape: prometheus-client has
//! no process collector of its own.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What /proc/self/stat says, in the units of the exposition.
struct Stat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        // A figure /proc cannot give (no /proc in the sandbox) is left out, not made up.
        if let Some(stat) = read_stat() {
            let cpu = ConstCounter::new(stat.cpu_seconds);
            cpu.encode(e.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                cpu.metric_type(),
            )?)?;
            gauge(
                e,
                "process_resident_memory",
                "Resident memory size",
                Some(&Unit::Bytes),
                stat.resident_bytes as f64,
            )?;
            gauge(
                e,
                "process_virtual_memory",
                "Virtual memory size",
                Some(&Unit::Bytes),
                stat.virtual_bytes as f64,
            )?;
            gauge(
                e,
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                stat.start_time_seconds,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                e,
                "process_open_fds",
                "Open file descriptors",
                None,
                fds.count() as f64,
            )?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            gauge(
                e,
                "process_max_fds",
                "The limit of open file descriptors",
                None,
                soft as f64,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(e.encode_descriptor(name, help, unit, gauge.metric_type())?)
}

fn read_stat() -> Option<Stat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which may itself contain spaces and parentheses.
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // stat(5) numbers fields from 1; the first after the name is field 3.
    let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
    let ticks = sysconf(nix::unistd::SysconfVar::CLK_TCK)? as f64;
    let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?;
    let boot_time = boot_time_seconds()?;
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: boot_time + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
    })
}

fn sysconf(variable: nix::unistd::SysconfVar) -> Option<u64> {
    let value = nix::unistd::sysconf(variable).ok()??;
    u64::try_from(value).ok().filter(|&v| v > 0)
}

/// `btime` of /proc/stat: the boot time, which process start times count from.
fn boot_time_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let stat = read_stat().expect("/proc/self/stat");
        assert!(stat.resident_bytes > 0);
        assert!(stat.start_time_seconds > 1_500_000_000.0);
    }
}
