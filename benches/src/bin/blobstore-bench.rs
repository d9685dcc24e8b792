fn main() {
    eprintln!("the blobstore benchmark is not written yet");
    std::process::exit(1);
}
