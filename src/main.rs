use clap::Parser;

fn main() {
    // `sdgen serve ...` is the server; anything else is a generation (a prompt that is the
    // word "serve" can be given after `--`)
    let mut argv = std::env::args_os();
    let result = if std::env::args_os().nth(1).is_some_and(|a| a == "serve") {
        let rest = argv.by_ref().skip(2);
        let args =
            sdgen::serve::ServeArgs::parse_from(std::iter::once("sdgen serve".into()).chain(rest));
        sdgen::serve::run(args)
    } else {
        sdgen::app::run(sdgen::cli::Args::parse())
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", sdgen::app::one_line(&e));
            sdgen::app::EXIT_FAILED
        }
    };
    std::process::exit(code);
}
