use clap::Parser;

fn main() {
    let args = sdgen::cli::Args::parse();
    let code = match sdgen::app::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, without the backtraces candle appends on
            // the lines after a message.
            let msg = e
                .chain()
                .map(|c| c.to_string().lines().next().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {msg}");
            sdgen::app::EXIT_FAILED
        }
    };
    std::process::exit(code);
}
