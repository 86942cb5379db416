//! `dsocr`: DeepSeek-OCR from the command line (see `dsocr::cli`).

fn main() -> std::process::ExitCode {
    dsocr::cli::main()
}
