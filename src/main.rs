use clap::Parser;

fn main() {
    let args = sdgen::cli::Args::parse();
    if let Err(e) = sdgen::app::run(args) {
        // One line: the error and its causes, no backtrace.
        let msg = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
