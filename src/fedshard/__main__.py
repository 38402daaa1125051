from fedshard.cli import main

main(prog_name="fedshard")
