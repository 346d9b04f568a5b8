import typer

app = typer.Typer()

@app.command()
def demo() -> None:
    print("hi")

def main() -> None:
    app()
