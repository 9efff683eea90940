//! The SVG timeline of a run (plotters): one lane per probe over time, each ok
//! sample a dot at its latency, each failure a red mark, outages shaded, and every
//! step a vertical line across the lanes with its name at the top.

use plotters::prelude::*;

use super::report::{Report, Sample};

const WIDTH: u32 = 1100;
const LANE: u32 = 120;
const HEAD: u32 = 70;

/// Outages as `(from, to)`: a run of failed samples until the next ok one (pure).
pub fn outages(samples: &[Sample], end: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut since: Option<f64> = None;
    for s in samples {
        match (s.ok, since) {
            (false, None) => since = Some(s.t_s),
            (true, Some(a)) => {
                out.push((a, s.t_s));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(a) = since {
        out.push((a, end));
    }
    out
}

pub fn svg(report: &Report) -> String {
    let mut buf = String::new();
    let lanes = report.probes.0.len().max(1) as u32;
    let height = HEAD + LANE * lanes + 40;
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, height)).into_drawing_area();
        if let Err(e) = draw(&root, report).and_then(|()| root.present().map_err(|e| e.to_string()))
        {
            tracing::warn!("cannot draw the timeline chart: {e}");
        }
    }
    buf
}

/// Plotters' errors borrow the backend; the chart only needs their text.
macro_rules! t {
    ($e:expr) => {
        $e.map_err(|e| e.to_string())?
    };
}

fn draw(
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    report: &Report,
) -> Result<(), String> {
    t!(root.fill(&WHITE));
    let dur = report.experiment.duration_s.max(0.001);
    let title = format!(
        "{} on {} ({} controllers, {} workers) - {} - {}",
        report.experiment.name,
        report.lab,
        report.manifest.controllers,
        report.manifest.workers,
        report.manifest.run_id,
        report.result
    );
    t!(root.draw(&Text::new(
        title,
        (10, 10),
        ("sans-serif", 16).into_font().color(&BLACK),
    )));
    let (head, body) = root.split_vertically(HEAD);
    // Step labels in the head, staggered so neighbours do not overlap.
    // Where a lane's plot starts and ends: its left margin and y label area, its
    // right margin (below).
    let x_of = |t: f64| 70.0 + (t / dur) * (WIDTH as f64 - 90.0);
    for (i, s) in report.steps.iter().enumerate() {
        let label = format!(
            "{} {}{}",
            s.id.clone().unwrap_or_else(|| format!("#{}", s.index + 1)),
            s.action,
            if s.nodes.is_empty() {
                String::new()
            } else {
                format!(" {}", s.nodes.join(","))
            }
        );
        let y = 32 + (i as i32 % 2) * 16;
        t!(head.draw(&Text::new(
            label,
            (x_of(s.actual_t_s) as i32 + 3, y),
            ("sans-serif", 12).into_font().color(&BLUE),
        )));
    }
    let areas = body.split_evenly((report.probes.0.len().max(1), 1));
    let last = areas.len().saturating_sub(1);
    for (i, ((name, p), area)) in report.probes.iter().zip(areas.iter()).enumerate() {
        let ymax = p
            .samples
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.latency_ms)
            .fold(1.0f64, f64::max)
            * 1.15;
        let caption = format!(
            "{name} ({}{}) available {} longest outage {:.1} s",
            p.kind,
            p.target
                .as_ref()
                .map(|t| format!(" {t}"))
                .unwrap_or_default(),
            p.availability
                .map(|a| format!("{:.1}%", a * 100.0))
                .unwrap_or("-".into()),
            p.longest_outage_s
        );
        let mut chart = ChartBuilder::on(area)
            .margin_left(10)
            .margin_right(20)
            .margin_top(4)
            .caption(caption, ("sans-serif", 13))
            .x_label_area_size(if i == last { 22 } else { 10 })
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..dur, 0f64..ymax)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .y_desc("ms")
            .y_labels(3)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_labels(if i == last { 12 } else { 0 })
            .x_label_formatter(&|x| format!("{x:.0} s"))
            .draw()
            .map_err(|e| e.to_string())?;
        // Outages shaded.
        t!(
            chart.draw_series(outages(&p.samples, dur).into_iter().map(|(a, b)| {
                Rectangle::new(
                    [(a, 0.0), (b.max(a + dur / 500.0), ymax)],
                    RGBColor(230, 60, 60).mix(0.18).filled(),
                )
            }))
        );
        // Steps as vertical lines.
        for s in &report.steps {
            t!(chart.draw_series(std::iter::once(PathElement::new(
                vec![(s.actual_t_s, 0.0), (s.actual_t_s, ymax)],
                BLUE.mix(0.6).stroke_width(1),
            ))));
        }
        t!(
            chart.draw_series(p.samples.iter().filter(|s| s.ok).map(|s| Circle::new(
                (s.t_s, s.latency_ms.min(ymax)),
                2,
                GREEN.mix(0.8).filled()
            )),)
        );
        t!(
            chart.draw_series(p.samples.iter().filter(|s| !s.ok).map(|s| {
                Cross::new(
                    (s.t_s, ymax * 0.5),
                    3,
                    RGBColor(200, 30, 30).stroke_width(1),
                )
            }))
        );
        // A state probe (leader, backends): its value where it changes.
        if matches!(p.kind.as_str(), "etcd-leader" | "lb-backends") {
            t!(
                chart.draw_series(changes(&p.samples).into_iter().map(|(t, v)| {
                    Text::new(
                        v,
                        (t, ymax * 0.92),
                        ("sans-serif", 11).into_font().color(&BLACK),
                    )
                }))
            );
        }
    }
    Ok(())
}

/// The first ok sample and every ok sample whose value differs from the one before:
/// `(t, value)` (pure).
pub fn changes(samples: &[Sample]) -> Vec<(f64, String)> {
    let mut out: Vec<(f64, String)> = Vec::new();
    for s in samples.iter().filter(|s| s.ok) {
        let v = s.value.clone().unwrap_or_default();
        if out.last().is_none_or(|(_, last)| *last != v) {
            out.push((s.t_s, v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, ok: bool) -> Sample {
        Sample::bare(t, ok)
    }

    #[test]
    fn outages_run_from_the_first_failure_to_the_next_ok_sample() {
        let v = vec![
            s(0.0, true),
            s(1.0, false),
            s(2.0, false),
            s(3.0, true),
            s(4.0, false),
        ];
        assert_eq!(outages(&v, 10.0), vec![(1.0, 3.0), (4.0, 10.0)]);
    }

    #[test]
    fn a_state_is_labelled_where_it_changes() {
        let mut v = vec![s(0.0, true), s(1.0, true), s(2.0, false), s(3.0, true)];
        for (x, l) in v.iter_mut().zip(["m1", "m1", "", "m2"]) {
            x.value = Some(l.into());
        }
        assert_eq!(
            changes(&v),
            vec![(0.0, "m1".to_string()), (3.0, "m2".to_string())]
        );
    }
}
