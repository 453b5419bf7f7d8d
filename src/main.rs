use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match herald::cli::main().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
