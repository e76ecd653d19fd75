//! Hit ratios of the eviction policies on a shuffled multi-epoch training
//! trace, against Belady's optimum. Prints a Markdown table.
//!
//! cargo run --release -p feedline-core --example eviction_trace -- \
//!     [objects] [epochs] [workers] [lookahead]

use feedline_core::evict::trace::{compare, TraceSpec};

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("argument {n} must be a whole number, got {a:?}"))
        })
        .unwrap_or(default)
}

fn main() -> feedline_core::Result<()> {
    let spec = TraceSpec {
        objects: arg(1, 20_000) as usize,
        block_bytes: 8 << 20,
        max_blocks: 8,
        ragged: true,
        epochs: arg(2, 4) as u32,
        workers: arg(3, 8) as u32,
        seed: 2026,
    };
    let lookahead = arg(4, 4096) as usize;
    let trace = spec.trace()?;
    println!(
        "{} objects, {} blocks of up to 8 MiB ({:.1} GiB), {} epochs, {} workers interleaved; \
         byte hit ratio over epochs 2..{}; plan-aware = S3-FIFO + Belady within {lookahead} reads\n",
        spec.objects,
        trace.blocks,
        trace.dataset_bytes as f64 / (1u64 << 30) as f64,
        spec.epochs,
        spec.workers,
        spec.epochs,
    );
    println!("| cache / dataset | LRU | S3-FIFO | plan-aware ({lookahead}) | plan-aware (epoch) | MIN (offline) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for row in compare(&trace, &[0.25, 0.5, 0.75, 1.0], lookahead)? {
        println!(
            "| {:.0}% | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            row.cache_share * 100.0,
            row.lru,
            row.s3fifo,
            row.plan_aware,
            row.plan_aware_epoch,
            row.min
        );
    }
    Ok(())
}
