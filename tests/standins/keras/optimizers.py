"""Stand-in optimizer: ``iterations`` counts the updates across epochs, like the real variable."""


class Variable:
    def __init__(self, value=0):
        self.value = value

    def assign_add(self, delta):
        self.value += delta

    def __int__(self):
        return int(self.value)


class SGD:
    def __init__(self, learning_rate=0.01):
        self.learning_rate = learning_rate
        self.iterations = Variable(0)

    def apply(self):
        self.iterations.assign_add(1)
