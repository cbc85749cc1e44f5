from embedstream.cli import app

app(prog_name="embedstream")
