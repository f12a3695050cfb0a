from bastion.gateway.cli import app

app()
