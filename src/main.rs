use clap::Parser;

fn main() {
    let args = sdgen::cli::Args::parse();
    let code = match sdgen::app::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", sdgen::app::one_line(&e));
            sdgen::app::EXIT_FAILED
        }
    };
    std::process::exit(code);
}
