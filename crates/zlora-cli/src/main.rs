fn main() { zlora::hello() }
