//! Baselines for the side-by-side benchmarks in `bench/`. Each baseline does the least work
//! that produces the same result as the Pulse component it is compared with.
