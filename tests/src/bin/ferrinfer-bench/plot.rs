//! The sweep as a picture: bandwidth against page size, one line per kernel and batch shape,
//! with the device-to-device copy and ferrinfer's read stream as the ceilings. Written as SVG
//! (no fonts or system libraries needed) from the results the JSON holds, so a saved run can
//! be drawn again with `--plot-from`.
use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::timing::BoxResult;

/// The chart's lines by (kernel, batch, tokens per sequence): (page size, GB/s) points in
/// sweep order.
type Lines = BTreeMap<(String, u64, u64), Vec<(usize, f64)>>;

fn label((kernel, batch, tokens): &(String, u64, u64)) -> String {
    format!("{kernel} {batch} × {tokens}")
}

/// The bandwidth rows of `results` (gather, append, decode), grouped into lines. Decode rows of
/// groups other than the first seen are left out: the chart is about page size and batch.
fn lines(results: &[Value]) -> Lines {
    let mut lines = Lines::new();
    let first_group = results.iter().find_map(|r| r["group"].as_u64());
    for r in results {
        let kernel = r["kernel"].as_str().unwrap_or("");
        let (Some(page_size), Some(gbs)) = (r["page_size"].as_u64(), r["gbs"].as_f64()) else { continue };
        let key = match kernel {
            "decode" if r["group"].as_u64() == first_group => {
                (kernel.to_string(), r["batch"].as_u64(), r["kv_len"].as_u64())
            }
            k if k == "gather" || k.starts_with("append") => {
                (k.to_string(), r["batch"].as_u64(), r["tokens_per_sequence"].as_u64())
            }
            _ => continue,
        };
        let kernel = match r["dtype"].as_str() {
            Some(dtype) if dtype != "f16" => format!("{} {dtype}", key.0),
            _ => key.0,
        };
        let key = (kernel, key.1.unwrap_or(0), key.2.unwrap_or(0));
        lines.entry(key).or_default().push((page_size as usize, gbs));
    }
    lines
}

/// Draws `results` to an SVG at `path`; page sizes are spaced evenly in the order they were
/// measured, since they are categories (1, 16, 64, 512, 7, 100) more than a scale.
pub fn write_svg(path: &Path, gpu: &str, results: &[Value], copy_gbs: f64, read_gbs: f64) -> BoxResult<()> {
    let lines = lines(results);
    let mut page_sizes: Vec<usize> = Vec::new();
    for &(ps, _) in lines.values().flatten() {
        if !page_sizes.contains(&ps) {
            page_sizes.push(ps);
        }
    }
    if page_sizes.is_empty() {
        return Err("no bandwidth results to plot".into());
    }
    let x_of = |ps: usize| page_sizes.iter().position(|&p| p == ps).unwrap_or(0) as f64;
    let top = lines.values().flatten().map(|&(_, g)| g).fold(copy_gbs.max(read_gbs), f64::max) * 1.08;

    let root = SVGBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("ferrinfer on {gpu}: bandwidth against page size"), ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.3f64..(page_sizes.len() as f64 - 0.7), 0f64..top)?;
    chart
        .configure_mesh()
        .x_labels(page_sizes.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                page_sizes.get(i as usize).map(|p| p.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("page size (tokens)")
        .y_desc("GB/s (decode: K and V read; gather, append: read + written)")
        .draw()?;
    let span = -0.3..(page_sizes.len() as f64 - 0.7);
    for (value, label, color) in
        [(copy_gbs, "device-to-device copy", BLACK), (read_gbs, "read stream", RGBColor(120, 120, 120))]
    {
        chart
            .draw_series(LineSeries::new([(span.start, value), (span.end, value)], color.stroke_width(2)))?
            .label(format!("{label}: {value:.0} GB/s"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for (i, (key, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = points.iter().map(|&(ps, g)| (x_of(ps), g)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label(key))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rows_become_one_line_per_kernel_and_batch_shape() {
        let results = vec![
            json!({"kernel": "decode", "page_size": 16, "batch": 64, "kv_len": 4096, "group": 4, "gbs": 4000.0}),
            json!({"kernel": "decode", "page_size": 7, "batch": 64, "kv_len": 4096, "group": 4, "gbs": 3900.0}),
            json!({"kernel": "decode", "page_size": 7, "batch": 64, "kv_len": 4096, "group": 5, "gbs": 1.0}),
            json!({"kernel": "gather", "page_size": 16, "batch": 64, "tokens_per_sequence": 4096, "gbs": 4100.0}),
            json!({"kernel": "prefill", "page_size": 16, "batch": 8, "tflops": 300.0}),
        ];
        let l = lines(&results);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(l[&("decode".to_string(), 64, 4096)], vec![(16, 4000.0), (7, 3900.0)]);
        assert_eq!(l[&("gather".to_string(), 64, 4096)], vec![(16, 4100.0)]);
        let path = std::env::temp_dir().join("ferrinfer-plot-test.svg");
        write_svg(&path, "a GPU", &results, 4300.0, 4400.0).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("decode 64 × 4096") && svg.contains("device-to-device copy"));
    }
}
