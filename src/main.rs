use clap::Parser;

fn main() {
    let args = sdgen::cli::Args::parse();
    let code = match sdgen::app::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {}", msg.replace('\n', " "));
            sdgen::app::EXIT_FAILED
        }
    };
    std::process::exit(code);
}
